-- The wide per-customer table for BI: RFM, segment, K-means cluster, CLV from each model, value
-- tier, value quadrant and lifecycle stage. One row per customer with an order before the run date.
-- Money in the currency of the exports; recency/tenure in days; predictions over the CLV step's
-- horizon (12 months in the shipped job).
--   value_tier      top_20 / next_30 / rest by predicted_clv (ties broken by customer_id)
--   value_quadrant  gold (high profit per order, many repeats), meteor (high profit, few repeats),
--                   stream (low profit, many repeats), burden (low, few); "high" and "many" mean
--                   strictly above params.quadrant_profit_per_order / params.quadrant_repeats
--                   (a number, or median_profit_per_order / median_repeats for the medians)
--   lifecycle_stage first rule that matches: new (tenure < new_days), churned (recency >=
--                   churn_days or p_alive < churn_p_alive), at_risk (recency >= at_risk_days or
--                   p_alive < at_risk_p_alive), mature (orders >= mature_orders and tenure >=
--                   mature_days), else active
with summary as (
    select * from customer_summary
),

base as (
    select
        s.customer_id,
        s.acquisition_channel,
        s.acquisition_cost,
        s.tenure_days,
        r.recency_days,
        r.frequency,
        r.monetary,
        r.r_score,
        r.f_score,
        r.m_score,
        r.rfm_score,
        r.segment,
        k.cluster,
        h.clv as historical_clv,
        d.clv as discounted_clv,
        p.p_alive,
        p.expected_purchases,
        p.expected_spend,
        p.clv as predicted_clv,
        s.gross_profit / s.orders as profit_per_order,
        s.orders - 1 as repeats
    from summary as s
    join rfm as r on r.customer_id = s.customer_id
    left join clusters as k on k.customer_id = s.customer_id
    left join clv_historical as h on h.customer_id = s.customer_id
    left join clv_discounted as d on d.customer_id = s.customer_id
    left join clv as p on p.customer_id = s.customer_id
),

medians as (
    select
        median(profit_per_order) as median_profit_per_order,
        median(repeats) as median_repeats
    from base
),

thresholds as (
    select
        cast({{ params.quadrant_profit_per_order }} as double) as profit_threshold,
        cast({{ params.quadrant_repeats }} as double) as repeat_threshold
    from medians
),

ranked as (
    select
        b.*,
        row_number() over (order by b.predicted_clv desc, b.customer_id) as value_rank,
        count(*) over () as customers
    from base as b
),

final as (
    select
        date '{{ run_date }}' as run_date,
        r.customer_id,
        r.acquisition_channel,
        r.acquisition_cost,
        r.tenure_days,
        r.recency_days,
        r.frequency,
        r.monetary,
        r.r_score,
        r.f_score,
        r.m_score,
        r.rfm_score,
        r.segment,
        r.cluster,
        round(r.historical_clv, 2) as historical_clv,
        round(r.discounted_clv, 2) as discounted_clv,
        r.p_alive,
        r.expected_purchases,
        r.expected_spend,
        round(r.predicted_clv, 2) as predicted_clv,
        case
            when r.value_rank <= 0.2 * r.customers then 'top_20'
            when r.value_rank <= 0.5 * r.customers then 'next_30'
            else 'rest'
        end as value_tier,
        case
            when r.profit_per_order > t.profit_threshold and r.repeats > t.repeat_threshold then 'gold'
            when r.profit_per_order > t.profit_threshold then 'meteor'
            when r.repeats > t.repeat_threshold then 'stream'
            else 'burden'
        end as value_quadrant,
        case
            when r.tenure_days < {{ params.new_days }} then 'new'
            when r.recency_days >= {{ params.churn_days }} or r.p_alive < {{ params.churn_p_alive }} then 'churned'
            when r.recency_days >= {{ params.at_risk_days }} or r.p_alive < {{ params.at_risk_p_alive }} then 'at_risk'
            when r.frequency >= {{ params.mature_orders }} and r.tenure_days >= {{ params.mature_days }} then 'mature'
            else 'active'
        end as lifecycle_stage
    from ranked as r
    cross join thresholds as t
)

select * from final
