-- One row per customer with at least one (net positive) order before the run date.
-- Time units: days. Money: the currency of the exports.
with orders as (
    select * from orders_clean
),

customers as (
    select * from customers
),

per_customer as (
    select
        customer_id,
        count(*) as orders,
        sum(net_amount) as revenue,
        min(order_ts) as first_order_ts,
        max(order_ts) as last_order_ts
    from orders
    group by customer_id
),

dated as (
    select
        p.*,
        cast(floor((date_part('epoch', timestamp '{{ run_date }} 00:00:00') - date_part('epoch', p.last_order_ts)) / 86400) as bigint) as recency_days,
        cast(floor((date_part('epoch', timestamp '{{ run_date }} 00:00:00') - date_part('epoch', p.first_order_ts)) / 86400) as bigint) as tenure_days
    from per_customer as p
),

final as (
    select
        date '{{ run_date }}' as run_date,
        d.customer_id,
        coalesce(c.acquisition_channel, 'unknown') as acquisition_channel,
        c.acquisition_cost,
        d.orders,
        round(d.revenue, 2) as revenue,
        round(d.revenue * {{ params.gross_margin }}, 2) as gross_profit,
        round(d.revenue / d.orders, 2) as avg_order_value,
        d.first_order_ts,
        d.last_order_ts,
        d.recency_days,
        d.tenure_days,
        case when d.recency_days < {{ params.active_days }} then 'active' else 'lapsed' end as status
    from dated as d
    left join customers as c on c.customer_id = d.customer_id
)

select * from final
