-- RFM scores and segments per customer, from rfm_features (sql/rfm_features.sql: recency in days
-- since the last order, frequency in distinct orders, monetary in total net spend).
--
-- Scores 1-5, 5 = best (most recent, most orders, most spend), from quintile cut points computed
-- once: with the customers' values sorted (recency negated, so larger is better), cut k (k = 1..4)
-- is the value at position ceil(k * n / 5), and a customer's score is 1 + the number of cuts its
-- value is strictly above. Customers with equal values always get equal scores (ties never split
-- on anything else), so scores are deterministic; heavy ties (e.g. most customers with one order)
-- leave some scores unused. Cut points are exact: values are counted in bins, and only the <= 4
-- bins holding a cut are sorted, so no step sorts all customers.
--
-- The segment comes from the R/F score map (input rfm_segment_map, reference/rfm_segment_map.csv):
-- the matching row with the lowest priority wins. Runs unchanged on DuckDB.
with per_customer as (
    select * from rfm_features
),

-- One row per customer and measure: (measure, value, bin). Larger value = better.
measures as (
    select 'r' as measure, cast(-recency_days as double) as value, cast(-recency_days as double) as bin, 1 as one from per_customer
    union all
    select 'f' as measure, cast(frequency as double) as value, cast(frequency as double) as bin, 1 as one from per_customer
    union all
    select 'm' as measure, monetary as value, floor(case when monetary >= 0 then ln(1 + monetary) else -ln(1 - monetary) end * 2000) as bin, 1 as one from per_customer
),

bins as (
    select measure, bin, count(*) as c
    from measures
    group by measure, bin
),

cumulative as (
    select
        measure,
        bin,
        c,
        sum(c) over (partition by measure order by bin rows between unbounded preceding and current row) as upto,
        sum(c) over (partition by measure) as n
    from bins
),

positions as (
    select q.k, cast(ceil(q.k * n.n / 5.0) as bigint) as position, n.measure
    from (select 1 as k union all select 2 union all select 3 union all select 4) as q
    cross join (select measure, max(n) as n from cumulative group by measure) as n
),

-- The bin holding each cut, and the cut's position inside that bin.
cut_bins as (
    select p.measure, p.k, c.bin, p.position - (c.upto - c.c) as offset
    from positions as p
    join cumulative as c
      on c.measure = p.measure
     and p.position > c.upto - c.c
     and p.position <= c.upto
),

in_cut_bins as (
    select
        m.measure,
        m.bin,
        m.value,
        row_number() over (partition by m.measure, m.bin order by m.value) as pos
    from measures as m
    join (select distinct measure, bin from cut_bins) as b
      on b.measure = m.measure and b.bin = m.bin
),

cuts as (
    select
        1 as one,
        max(case when b.measure = 'r' and b.k = 1 then i.value end) as r1,
        max(case when b.measure = 'r' and b.k = 2 then i.value end) as r2,
        max(case when b.measure = 'r' and b.k = 3 then i.value end) as r3,
        max(case when b.measure = 'r' and b.k = 4 then i.value end) as r4,
        max(case when b.measure = 'f' and b.k = 1 then i.value end) as f1,
        max(case when b.measure = 'f' and b.k = 2 then i.value end) as f2,
        max(case when b.measure = 'f' and b.k = 3 then i.value end) as f3,
        max(case when b.measure = 'f' and b.k = 4 then i.value end) as f4,
        max(case when b.measure = 'm' and b.k = 1 then i.value end) as m1,
        max(case when b.measure = 'm' and b.k = 2 then i.value end) as m2,
        max(case when b.measure = 'm' and b.k = 3 then i.value end) as m3,
        max(case when b.measure = 'm' and b.k = 4 then i.value end) as m4
    from cut_bins as b
    join in_cut_bins as i
      on i.measure = b.measure and i.bin = b.bin and i.pos = b.offset
),

scored as (
    select
        p.customer_id,
        p.recency_days,
        p.frequency,
        p.monetary,
        cast(1 + (case when -p.recency_days > c.r1 then 1 else 0 end) + (case when -p.recency_days > c.r2 then 1 else 0 end)
               + (case when -p.recency_days > c.r3 then 1 else 0 end) + (case when -p.recency_days > c.r4 then 1 else 0 end) as bigint) as r_score,
        cast(1 + (case when p.frequency > c.f1 then 1 else 0 end) + (case when p.frequency > c.f2 then 1 else 0 end)
               + (case when p.frequency > c.f3 then 1 else 0 end) + (case when p.frequency > c.f4 then 1 else 0 end) as bigint) as f_score,
        cast(1 + (case when p.monetary > c.m1 then 1 else 0 end) + (case when p.monetary > c.m2 then 1 else 0 end)
               + (case when p.monetary > c.m3 then 1 else 0 end) + (case when p.monetary > c.m4 then 1 else 0 end) as bigint) as m_score
    from (select *, 1 as one from per_customer) as p
    join cuts as c on c.one = p.one
),

-- The score map expanded to its 25 R x F cells (lowest priority wins), joined by equality.
cells as (
    select r.s as r_score, f.s as f_score
    from (select 1 as s union all select 2 union all select 3 union all select 4 union all select 5) as r
    cross join (select 1 as s union all select 2 union all select 3 union all select 4 union all select 5) as f
),

cell_segments as (
    select r_score, f_score, segment, segment_id
    from (
        select
            c.r_score,
            c.f_score,
            m.segment,
            m.segment_id,
            row_number() over (partition by c.r_score, c.f_score order by m.priority, m.segment_id) as pick
        from cells as c
        join rfm_segment_map as m
          on c.r_score between m.r_min and m.r_max
         and c.f_score between m.f_min and m.f_max
    ) as ranked
    where pick = 1
),

final as (
    select
        date '{{ run_date }}' as run_date,
        s.customer_id,
        s.recency_days,
        s.frequency,
        s.monetary,
        s.r_score,
        s.f_score,
        s.m_score,
        cast(s.r_score as varchar) || cast(s.f_score as varchar) || cast(s.m_score as varchar) as rfm_score,
        g.segment,
        g.segment_id
    from scored as s
    join cell_segments as g
      on g.r_score = s.r_score and g.f_score = s.f_score
)

select * from final
