-- One row per customer with an order before the run date: the RFM features, the BTYD summary
-- for the predictive CLV models and its calibration/holdout split, in one pass over the orders
-- grouped by purchase day (UTC calendar days; several orders on one day are one purchase).
--
--   first_order_date, last_order_date   first and last purchase day
--   recency_days       days from the last purchase day to the run date (1 = the day before)
--   tenure_days        days from the first purchase day to the run date
--   frequency          distinct orders
--   monetary           total net spend (currency of the exports, 2 decimals)
--   x                  repeat purchases: purchase days after the first
--   t_x                weeks from the first purchase day to the last
--   t                  weeks from the first purchase day to the run date (the customer's age, T)
--   mean_repeat_spend  mean net spend per repeat purchase day, from cent-rounded sums (NULL when x = 0)
--   x_calibration, t_x_calibration, t_calibration
--                      the same as x, t_x, t with the run date moved back to the cut-off,
--                      {{ params.holdout_weeks }} weeks before it (NULL for customers whose first purchase is after it)
--   x_holdout          purchase days from the cut-off to the run date (NULL likewise)
--
-- arg_min(value, key) is the value at the smallest key (built into DuckDB, added by clvflow).
-- Runs unchanged on DuckDB.
with orders as (
    select customer_id, order_ts, net_amount from orders_clean
),

days as (
    select
        customer_id,
        cast(order_ts as date) as order_day,
        count(*) as orders,
        sum(net_amount) as amount
    from orders
    group by customer_id, cast(order_ts as date)
),

per_customer as (
    select
        customer_id,
        count(*) as purchase_days,
        sum(orders) as frequency,
        sum(amount) as revenue,
        min(order_day) as first_day,
        max(order_day) as last_day,
        arg_min(amount, order_day) as first_day_amount,
        sum(case when order_day < date '{{ run_date }}' - interval '{{ params.holdout_weeks }} weeks' then 1 else 0 end) as calibration_days,
        max(case when order_day < date '{{ run_date }}' - interval '{{ params.holdout_weeks }} weeks' then order_day end) as calibration_last_day
    from days
    group by customer_id
),

epochs as (
    select
        *,
        date_part('epoch', date '{{ run_date }}') as now_epoch,
        date_part('epoch', date '{{ run_date }}' - interval '{{ params.holdout_weeks }} weeks') as cutoff_epoch,
        date_part('epoch', first_day) as first_epoch,
        date_part('epoch', last_day) as last_epoch,
        date_part('epoch', calibration_last_day) as calibration_last_epoch
    from per_customer
),

final as (
    select
        customer_id,
        first_day as first_order_date,
        last_day as last_order_date,
        cast((now_epoch - last_epoch) / 86400 as bigint) as recency_days,
        cast((now_epoch - first_epoch) / 86400 as bigint) as tenure_days,
        frequency,
        round(revenue, 2) as monetary,
        cast(purchase_days - 1 as double) as x,
        (last_epoch - first_epoch) / 604800.0 as t_x,
        (now_epoch - first_epoch) / 604800.0 as t,
        -- In cents: a float sum's last bits follow the order rows arrive in, which changes from
        -- run to run; the model fitted on it would too.
        case when purchase_days > 1 then (round(revenue, 2) - round(first_day_amount, 2)) / (purchase_days - 1) end as mean_repeat_spend,
        case when calibration_days > 0 then cast(calibration_days - 1 as double) end as x_calibration,
        case when calibration_days > 0 then (calibration_last_epoch - first_epoch) / 604800.0 end as t_x_calibration,
        case when calibration_days > 0 then (cutoff_epoch - first_epoch) / 604800.0 end as t_calibration,
        case when calibration_days > 0 then cast(purchase_days - calibration_days as double) end as x_holdout
    from epochs
)

select * from final
