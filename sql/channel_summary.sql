-- Per acquisition channel: buyers, repeat rate, revenue, and gross profit per buyer against the
-- average acquisition cost (profit_to_cac < 1: the channel's buyers have not yet paid back).
-- Gross profit = the historical CLV model (realized net revenue x margin).
with customers as (
    select * from customer_value
),

final as (
    select
        run_date,
        acquisition_channel,
        count(*) as buyers,
        sum(case when frequency > 1 then 1 else 0 end) as repeat_buyers,
        round(avg(case when frequency > 1 then 1.0 else 0.0 end), 4) as repeat_rate,
        round(sum(monetary), 2) as revenue,
        round(avg(historical_clv), 2) as gross_profit_per_buyer,
        round(avg(acquisition_cost), 2) as avg_acquisition_cost,
        round(avg(historical_clv) / nullif(avg(acquisition_cost), 0), 3) as profit_to_cac
    from customers
    group by run_date, acquisition_channel
)

select * from final order by acquisition_channel
