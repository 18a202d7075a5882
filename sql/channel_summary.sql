-- Per acquisition channel: buyers, repeat rate, revenue, and gross profit per buyer against the
-- average acquisition cost (profit_to_cac < 1: the channel's buyers have not yet paid back).
with summary as (
    select * from customer_summary
),

final as (
    select
        run_date,
        acquisition_channel,
        count(*) as buyers,
        sum(case when orders > 1 then 1 else 0 end) as repeat_buyers,
        round(avg(case when orders > 1 then 1.0 else 0.0 end), 4) as repeat_rate,
        round(sum(revenue), 2) as revenue,
        round(avg(gross_profit), 2) as gross_profit_per_buyer,
        round(avg(acquisition_cost), 2) as avg_acquisition_cost,
        round(avg(gross_profit) / nullif(avg(acquisition_cost), 0), 3) as profit_to_cac
    from summary
    group by run_date, acquisition_channel
)

select * from final order by acquisition_channel
