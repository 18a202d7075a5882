-- Retention and repeat-purchase rate by acquisition cohort (the calendar month of signup, UTC).
-- One row per cohort and month_number (0 = the signup month, 1 = the next, ...) up to the run
-- last month with an order: active_customers ordered in that month; retention_rate = active /
-- cohort size.
-- buyers / repeat_buyers / repeat_purchase_rate are per cohort (repeated on each of its rows):
-- customers with at least one / at least two orders before the run date. Orders before signup are
-- not counted. Runs unchanged on DuckDB.
with orders as (
    select * from orders_clean
),

cohorts as (
    select
        customer_id,
        cast(date_trunc('month', signup_ts) as date) as cohort_month,
        date_part('year', signup_ts) * 12 + date_part('month', signup_ts) as cohort_index
    from customers
    where customer_id is not null
      and signup_ts < timestamp '{{ run_date }} 00:00:00'
),

cohort_size as (
    select cohort_month, max(cohort_index) as cohort_index, count(*) as customers
    from cohorts
    group by cohort_month
),

calendar as (
    select distinct date_part('year', order_ts) * 12 + date_part('month', order_ts) as month_index
    from orders
    union
    select distinct cohort_index as month_index
    from cohorts
),

months as (
    select
        s.cohort_month,
        s.customers,
        cast(c.month_index - s.cohort_index as bigint) as month_number
    from cohort_size as s
    join calendar as c on c.month_index >= s.cohort_index
),

activity as (
    select
        c.cohort_month,
        cast(date_part('year', o.order_ts) * 12 + date_part('month', o.order_ts) - c.cohort_index as bigint) as month_number,
        count(distinct o.customer_id) as active_customers
    from orders as o
    join cohorts as c on c.customer_id = o.customer_id
    group by 1, 2
),

buyers as (
    select
        c.cohort_month,
        count(*) as buyers,
        sum(case when b.orders >= 2 then 1 else 0 end) as repeat_buyers
    from (select customer_id, count(*) as orders from orders group by customer_id) as b
    join cohorts as c on c.customer_id = b.customer_id
    group by c.cohort_month
),

final as (
    select
        date '{{ run_date }}' as run_date,
        m.cohort_month,
        m.month_number,
        m.customers as cohort_customers,
        coalesce(a.active_customers, 0) as active_customers,
        round(coalesce(a.active_customers, 0) * 1.0 / m.customers, 4) as retention_rate,
        coalesce(b.buyers, 0) as buyers,
        coalesce(b.repeat_buyers, 0) as repeat_buyers,
        round(coalesce(b.repeat_buyers, 0) * 1.0 / nullif(b.buyers, 0), 4) as repeat_purchase_rate
    from months as m
    left join activity as a on a.cohort_month = m.cohort_month and a.month_number = m.month_number
    left join buyers as b on b.cohort_month = m.cohort_month
)

select * from final order by cohort_month, month_number
