-- RFM per customer as of the run date. Recency in days since the last order, frequency in
-- distinct orders, monetary in total net spend. Quintile scores 1-5, 5 = best (most recent, most
-- orders, most spend); ties are broken by customer_id, so scores are deterministic. The segment
-- comes from the R/F score map (input rfm_segment_map, reference/rfm_segment_map.csv): the
-- matching row with the lowest priority wins. Runs unchanged on DuckDB.
with orders as (
    select * from orders_clean
),

segment_map as (
    select * from rfm_segment_map
),

per_customer as (
    select
        customer_id,
        cast(floor((date_part('epoch', timestamp '{{ run_date }} 00:00:00') - date_part('epoch', max(order_ts))) / 86400) as bigint) as recency_days,
        count(*) as frequency,
        round(sum(net_amount), 2) as monetary
    from orders
    group by customer_id
),

scored as (
    select
        *,
        cast(ntile(5) over (order by recency_days desc, customer_id) as bigint) as r_score,
        cast(ntile(5) over (order by frequency, customer_id) as bigint) as f_score,
        cast(ntile(5) over (order by monetary, customer_id) as bigint) as m_score
    from per_customer
),

segmented as (
    select
        s.*,
        m.segment,
        m.segment_id,
        row_number() over (partition by s.customer_id order by m.priority) as pick
    from scored as s
    join segment_map as m
      on s.r_score between m.r_min and m.r_max
     and s.f_score between m.f_min and m.f_max
),

final as (
    select
        date '{{ run_date }}' as run_date,
        customer_id,
        recency_days,
        frequency,
        monetary,
        r_score,
        f_score,
        m_score,
        cast(r_score as varchar) || cast(f_score as varchar) || cast(m_score as varchar) as rfm_score,
        segment,
        segment_id
    from segmented
    where pick = 1
)

select * from final
