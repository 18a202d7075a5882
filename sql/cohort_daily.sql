-- Dynamic LTV, the one pass over the orders: per acquisition cohort (the calendar month of signup,
-- UTC), acquisition channel and day after each customer's own signup (day 0 = the signup day's
-- first 24 hours), the net revenue of the orders on that day and the number of customers whose
-- second order fell on it. Orders before signup are not counted. Small (cohorts x channels x
-- days), so `cohort_value` reads it several times instead of joining the orders again.
-- Sums over customers: the shipped job runs it split by customer_id with `split_result: partial`
-- when the orders do not fit (one row per cohort, channel, day and bucket), and `cohort_value`
-- sums its rows per cohort, channel and day again.
-- A customer's second order day is second_min(day) in a hash aggregation per customer (clvflow's
-- aggregate; DuckDB spells it min(day, 2)[2]): no sort of every order by customer and time for a
-- window, which costs DataFusion 55 more and holds more memory than the aggregation. The join
-- with the customers runs twice (DataFusion does not share a CTE between its two readers): still
-- cheaper than the sort.
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
        cast(floor((date_part('epoch', o.order_ts) - date_part('epoch', a.signup_ts)) / 86400) as bigint) as day,
        o.net_amount
    from orders_clean as o
    join acquired as a on a.customer_id = o.customer_id
    where o.order_ts >= a.signup_ts
),

daily as (
    select cohort_month, channel, day, sum(net_amount) as revenue
    from orders
    group by cohort_month, channel, day
),

second_days as (
    select cohort_month, channel, second_min(day) as day
    from orders
    group by customer_id, cohort_month, channel
),

seconds as (
    select cohort_month, channel, day, count(*) as second_buyers
    from second_days
    where day is not null
    group by cohort_month, channel, day
)

-- Every second order day is a day with orders, so the days with revenue hold them all.
select
    d.cohort_month,
    d.channel,
    d.day,
    d.revenue,
    coalesce(s.second_buyers, 0) as second_buyers
from daily as d
left join seconds as s
    on s.cohort_month = d.cohort_month and s.channel = d.channel and s.day = d.day
order by d.cohort_month, d.channel, d.day
