-- One row per order, as of the run date. Declared cleaning rules:
--   * exact duplicate rows (every column equal) are collapsed;
--   * rows with a NULL customer_id are dropped;
--   * lines at or after the run date (00:00 UTC) are ignored;
--   * returns (negative lines) are netted into their order; an order whose net amount is not
--     positive (fully returned) is dropped;
--   * order_ts is the time of the first line of the order; gross_amount is the order's sales
--     before returns, net_amount after.
-- The line's channel takes part in duplicate detection but is not carried per order (a string
-- MIN per order costs DataFusion 55 more than the rest of this query; add it if you need it).
with source as (
    select distinct customer_id, order_id, order_ts, amount, channel
    from orders
),

in_scope as (
    select *
    from source
    where customer_id is not null
      and order_ts < timestamp '{{ run_date }} 00:00:00'
),

netted as (
    select
        customer_id,
        order_id,
        min(order_ts) as order_ts,
        sum(case when amount > 0 then amount else 0 end) as gross_amount,
        sum(amount) as net_amount
    from in_scope
    group by customer_id, order_id
),

final as (
    select customer_id, order_id, order_ts, gross_amount, net_amount
    from netted
    where net_amount > 0
)

select * from final
