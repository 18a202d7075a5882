-- Calibration / holdout split of the BTYD summary, the input of the CLV step's `backtest`.
-- The calibration period ends {{ params.holdout_weeks }} weeks before the run date; customers whose first
-- purchase is before that cut-off are kept. Time unit: weeks. Same-day orders are one purchase.
--   x, t_x, t      the BTYD summary as of the cut-off (see btyd_summary.sql)
--   x_holdout      purchase days from the cut-off to the run date (what the model must predict)
--   holdout_weeks  length of the holdout period
-- Written in SQL that DuckDB runs unchanged.
with orders as (
    select * from orders_clean
),

cutoff as (
    select date_part('epoch', timestamp '{{ run_date }} 00:00:00') - {{ params.holdout_weeks }} * 604800.0 as cutoff_epoch
),

days as (
    select customer_id, date_trunc('day', order_ts) as order_day
    from orders
    group by customer_id, date_trunc('day', order_ts)
),

split as (
    select d.customer_id, d.order_day, date_part('epoch', d.order_day) < c.cutoff_epoch as in_calibration, c.cutoff_epoch
    from days as d
    cross join cutoff as c
),

calibration as (
    select customer_id, min(order_day) as first_day, max(order_day) as last_day, count(*) as purchase_days, max(cutoff_epoch) as cutoff_epoch
    from split
    where in_calibration
    group by customer_id
),

holdout as (
    select customer_id, count(*) as purchase_days
    from split
    where not in_calibration
    group by customer_id
),

final as (
    select
        c.customer_id,
        cast(c.purchase_days - 1 as double) as x,
        (date_part('epoch', c.last_day) - date_part('epoch', c.first_day)) / 604800.0 as t_x,
        (c.cutoff_epoch - date_part('epoch', c.first_day)) / 604800.0 as t,
        cast(coalesce(h.purchase_days, 0) as double) as x_holdout,
        cast({{ params.holdout_weeks }} as double) as holdout_weeks
    from calibration as c
    left join holdout as h on h.customer_id = c.customer_id
)

select * from final
