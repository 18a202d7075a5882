-- Dynamic LTV, the one pass over the orders: per acquisition cohort (the calendar month of signup,
-- UTC), acquisition channel and day after each customer's own signup (day 0 = the signup day's
-- first 24 hours), the net revenue of the orders on that day and the number of customers whose
-- second order fell on it. Orders before signup are not counted. Small (cohorts x channels x
-- days), so `cohort_value` reads it several times instead of joining the orders again.
-- A customer's second order is the row after their first in (customer_id, order_ts) order: one
-- global sort and two lags, not row_number() per customer (DataFusion 55 pays per window
-- partition, and there is one per customer). Runs unchanged on DuckDB.
with acquired as (
    select
        customer_id,
        signup_ts,
        cast(date_trunc('month', signup_ts) as date) as cohort_month,
        acquisition_channel as channel
    from customers
    where customer_id is not null
      and signup_ts < timestamp '{{ run_date }} 00:00:00'
),

orders as (
    select
        a.cohort_month,
        a.channel,
        o.customer_id,
        o.order_ts,
        cast(floor((date_part('epoch', o.order_ts) - date_part('epoch', a.signup_ts)) / 86400) as bigint) as day,
        o.net_amount
    from orders_clean as o
    join acquired as a on a.customer_id = o.customer_id
    where o.order_ts >= a.signup_ts
),

ranked as (
    select
        cohort_month,
        channel,
        day,
        net_amount,
        lag(customer_id, 1) over (order by customer_id, order_ts) = customer_id
            and lag(customer_id, 2) over (order by customer_id, order_ts) is distinct from customer_id as is_second
    from orders
)

select
    cohort_month,
    channel,
    day,
    sum(net_amount) as revenue,
    count(case when is_second then 1 end) as second_buyers
from ranked
group by cohort_month, channel, day
order by cohort_month, channel, day
