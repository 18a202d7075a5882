-- The wide per-customer table for BI: RFM, segment, K-means cluster, CLV from each model, value
-- tier, value quadrant and lifecycle stage. One row per customer with an order before the run date.
-- Money in the currency of the exports; recency/tenure in days; predictions over the CLV step's
-- horizon (12 months in the shipped job).
--   value_rank      1 = the highest predicted_clv (ties broken by customer_id): the CLV step's
--                   clv_rank, the same as row_number() over (order by clv desc, customer_id)
--   value_tier      top_20 / next_30 / rest by value_rank
--   value_quadrant  gold (high profit per order, many repeats), meteor (high profit, few repeats),
--                   stream (low profit, many repeats), burden (low, few); "high" and "many" mean
--                   strictly above params.quadrant_profit_per_order / params.quadrant_repeats
--                   (a number, or median_profit_per_order / median_repeats for the medians);
--                   profit per order = monetary x gross_margin / frequency, repeats = frequency - 1
--   lifecycle_stage first rule that matches: new (tenure < new_days), churned (recency >=
--                   churn_days or p_alive < churn_p_alive), at_risk (recency >= at_risk_days or
--                   p_alive < at_risk_p_alive), mature (frequency >= mature_orders and tenure >=
--                   mature_days), else active
-- Each heavy input is a step table read once per use: DataFusion does not share a CTE used twice.
with scored as (
    -- customer_features + RFM scores and segment + K-means cluster + BG/NBD predictions: the
    -- model steps append their columns to the rows they read.
    select * from clv
),

medians as (
    select
        median(monetary * {{ params.gross_margin }} / frequency) as median_profit_per_order,
        median(frequency - 1) as median_repeats
    from clv
),

thresholds as (
    select
        cast({{ params.quadrant_profit_per_order }} as double) as profit_threshold,
        cast({{ params.quadrant_repeats }} as double) as repeat_threshold
    from medians
),

counted as (
    select count(*) as customers from clv
),

-- The narrow per-customer values from elsewhere, joined to each other first (DataFusion builds
-- a join's hash table from its first input, so the wide table comes last, once).
extras as (
    select
        q.customer_id,
        coalesce(c.acquisition_channel, 'unknown') as acquisition_channel,
        c.acquisition_cost,
        -- The historical model (realized gross profit) is the discounted step's exact revenue
        -- times the margin: the same value as a `model: historical` step, without its own pass.
        d.revenue * {{ params.gross_margin }} as historical_clv,
        d.clv as discounted_clv
    from (select customer_id from clv) as q
    left join customers as c on c.customer_id = q.customer_id
    left join clv_discounted as d on d.customer_id = q.customer_id
),

base as (
    select
        s.*,
        e.acquisition_channel,
        e.acquisition_cost,
        e.historical_clv,
        e.discounted_clv,
        s.monetary * {{ params.gross_margin }} / s.frequency as profit_per_order,
        s.frequency - 1 as repeats
    from extras as e
    join scored as s on s.customer_id = e.customer_id
),

final as (
    select
        date '{{ run_date }}' as run_date,
        b.customer_id,
        b.acquisition_channel,
        b.acquisition_cost,
        b.tenure_days,
        b.recency_days,
        b.frequency,
        b.monetary,
        b.r_score,
        b.f_score,
        b.m_score,
        b.rfm_score,
        b.segment,
        b.segment_id,
        b.cluster,
        round(b.historical_clv, 2) as historical_clv,
        round(b.discounted_clv, 2) as discounted_clv,
        b.p_alive,
        b.expected_purchases,
        b.expected_spend,
        round(b.clv, 2) as predicted_clv,
        b.clv_rank as value_rank,
        case
            when b.clv_rank <= 0.2 * n.customers then 'top_20'
            when b.clv_rank <= 0.5 * n.customers then 'next_30'
            else 'rest'
        end as value_tier,
        case
            when b.profit_per_order > t.profit_threshold and b.repeats > t.repeat_threshold then 'gold'
            when b.profit_per_order > t.profit_threshold then 'meteor'
            when b.repeats > t.repeat_threshold then 'stream'
            else 'burden'
        end as value_quadrant,
        case
            when b.tenure_days < {{ params.new_days }} then 'new'
            when b.recency_days >= {{ params.churn_days }} or b.p_alive < {{ params.churn_p_alive }} then 'churned'
            when b.recency_days >= {{ params.at_risk_days }} or b.p_alive < {{ params.at_risk_p_alive }} then 'at_risk'
            when b.frequency >= {{ params.mature_orders }} and b.tenure_days >= {{ params.mature_days }} then 'mature'
            else 'active'
        end as lifecycle_stage
    from base as b
    cross join thresholds as t
    cross join counted as n
)

select * from final
