-- LTV : CAC per acquisition channel. LTV per customer = gross profit so far (historical_clv) +
-- predicted future profit (predicted_clv, the CLV step's horizon). CAC = the customers export's
-- acquisition_cost. below_break_even: the channel's customers are worth less than they cost.
with customers as (
    select * from customer_value
),

final as (
    select
        run_date,
        acquisition_channel,
        count(*) as customers,
        round(avg(acquisition_cost), 2) as avg_cac,
        round(avg(historical_clv), 2) as avg_historical_clv,
        round(avg(predicted_clv), 2) as avg_predicted_clv,
        round(avg(historical_clv + predicted_clv), 2) as avg_ltv,
        round(avg(historical_clv + predicted_clv) / nullif(avg(acquisition_cost), 0), 3) as ltv_to_cac,
        avg(historical_clv + predicted_clv) < avg(acquisition_cost) as below_break_even
    from customers
    group by run_date, acquisition_channel
)

select * from final order by acquisition_channel
