-- The 80/20 check: each value tier's customers and its share of total predicted and historical
-- value (shares of the run's totals, 0-1).
with customers as (
    select * from customer_value
),

totals as (
    select count(*) as customers, sum(predicted_clv) as predicted, sum(historical_clv) as historical
    from customers
),

final as (
    select
        c.run_date,
        c.value_tier,
        count(*) as customers,
        round(count(*) * 1.0 / max(t.customers), 4) as customer_share,
        round(sum(c.predicted_clv), 2) as predicted_clv,
        round(sum(c.predicted_clv) / nullif(max(t.predicted), 0), 4) as predicted_value_share,
        round(sum(c.historical_clv), 2) as historical_clv,
        round(sum(c.historical_clv) / nullif(max(t.historical), 0), 4) as historical_value_share
    from customers as c
    cross join totals as t
    group by c.run_date, c.value_tier
)

select * from final order by value_tier
