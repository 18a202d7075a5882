-- RFM features per customer as of the run date (the input of sql/rfm.sql): recency in days from
-- the last order to the run date, frequency in distinct orders, monetary in total net spend.
-- A step of its own so that the scoring, which reads it several times, reads it materialised.
with orders as (
    select * from orders_clean
),

final as (
    select
        customer_id,
        cast(floor((date_part('epoch', timestamp '{{ run_date }} 00:00:00') - date_part('epoch', max(order_ts))) / 86400) as bigint) as recency_days,
        count(*) as frequency,
        round(sum(net_amount), 2) as monetary
    from orders
    group by customer_id
)

select * from final
