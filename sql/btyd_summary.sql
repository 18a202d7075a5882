-- The BTYD summary per customer, the input of the predictive CLV step. Time unit: weeks.
--   x                  repeat purchases: purchase days after the first (same-day orders merged)
--   t_x                weeks from the first purchase day to the last
--   t                  weeks from the first purchase day to the run date (the customer's age, T)
--   mean_repeat_spend  mean net spend per repeat purchase day (NULL when x = 0)
-- Written in SQL that DuckDB runs unchanged.
with orders as (
    select * from orders_clean
),

days as (
    select customer_id, date_trunc('day', order_ts) as order_day, sum(net_amount) as amount
    from orders
    group by customer_id, date_trunc('day', order_ts)
),

bounds as (
    select customer_id, min(order_day) as first_day, max(order_day) as last_day, count(*) as purchase_days
    from days
    group by customer_id
),

repeat_spend as (
    select d.customer_id, avg(d.amount) as mean_repeat_spend
    from days as d
    join bounds as b on b.customer_id = d.customer_id
    where d.order_day > b.first_day
    group by d.customer_id
),

final as (
    select
        b.customer_id,
        cast(b.purchase_days - 1 as double) as x,
        (date_part('epoch', b.last_day) - date_part('epoch', b.first_day)) / 604800.0 as t_x,
        (date_part('epoch', timestamp '{{ run_date }} 00:00:00') - date_part('epoch', b.first_day)) / 604800.0 as t,
        r.mean_repeat_spend
    from bounds as b
    left join repeat_spend as r on r.customer_id = b.customer_id
)

select * from final
