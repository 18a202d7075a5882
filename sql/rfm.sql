-- RFM scores and segments per customer, with customer_features' RFM and BTYD columns (recency_days:
-- days from the last purchase date to the run date; frequency: distinct orders; monetary: total
-- net spend).
--
-- Scores 1-5, 5 = best (most recent, most orders, most spend), from quintile cut points
-- computed once per measure: with the customers' values sorted ascending (recency negated, so
-- larger is better), cut k (k = 1..4) is the value at position ceil(k * n / 5), and a
-- customer's score is 1 + the number of cuts its value is strictly above. Equal values always
-- get equal scores (ties never split on anything else), so scores are deterministic; heavy ties
-- (e.g. most customers with one order) leave some scores unused. Cut points are exact: each
-- measure's distinct values are counted, and the cut is the first value whose running count
-- reaches the position. No step sorts or windows over all customers.
--
-- The segment comes from the R/F score map (input rfm_segment_map, reference/rfm_segment_map.csv):
-- the matching row with the lowest priority wins. Runs unchanged on DuckDB.
with features as (
    select * from customer_features
),

customers as (
    select count(*) as n from customer_features
),

-- Running counts of each measure's distinct values, ascending (larger = better).
r_values as (
    select v, sum(c) over (order by v rows between unbounded preceding and current row) as upto
    from (select -recency_days as v, count(*) as c from customer_features group by -recency_days) as counted
),

f_values as (
    select v, sum(c) over (order by v rows between unbounded preceding and current row) as upto
    from (select frequency as v, count(*) as c from customer_features group by frequency) as counted
),

m_values as (
    select v, sum(c) over (order by v rows between unbounded preceding and current row) as upto
    from (select monetary as v, count(*) as c from customer_features group by monetary) as counted
),

-- Cut k: the first value whose running count reaches position ceil(k * n / 5).
r_cuts as (
    select
        min(case when v.upto >= ceil(1 * n.n / 5.0) then v.v end) as r1,
        min(case when v.upto >= ceil(2 * n.n / 5.0) then v.v end) as r2,
        min(case when v.upto >= ceil(3 * n.n / 5.0) then v.v end) as r3,
        min(case when v.upto >= ceil(4 * n.n / 5.0) then v.v end) as r4
    from r_values as v
    cross join customers as n
),

f_cuts as (
    select
        min(case when v.upto >= ceil(1 * n.n / 5.0) then v.v end) as f1,
        min(case when v.upto >= ceil(2 * n.n / 5.0) then v.v end) as f2,
        min(case when v.upto >= ceil(3 * n.n / 5.0) then v.v end) as f3,
        min(case when v.upto >= ceil(4 * n.n / 5.0) then v.v end) as f4
    from f_values as v
    cross join customers as n
),

m_cuts as (
    select
        min(case when v.upto >= ceil(1 * n.n / 5.0) then v.v end) as m1,
        min(case when v.upto >= ceil(2 * n.n / 5.0) then v.v end) as m2,
        min(case when v.upto >= ceil(3 * n.n / 5.0) then v.v end) as m3,
        min(case when v.upto >= ceil(4 * n.n / 5.0) then v.v end) as m4
    from m_values as v
    cross join customers as n
),

scored as (
    select
        p.*,
        1 + cast(-p.recency_days > r.r1 as bigint) + cast(-p.recency_days > r.r2 as bigint)
          + cast(-p.recency_days > r.r3 as bigint) + cast(-p.recency_days > r.r4 as bigint) as r_score,
        1 + cast(p.frequency > f.f1 as bigint) + cast(p.frequency > f.f2 as bigint)
          + cast(p.frequency > f.f3 as bigint) + cast(p.frequency > f.f4 as bigint) as f_score,
        1 + cast(p.monetary > m.m1 as bigint) + cast(p.monetary > m.m2 as bigint)
          + cast(p.monetary > m.m3 as bigint) + cast(p.monetary > m.m4 as bigint) as m_score
    from features as p
    cross join r_cuts as r
    cross join f_cuts as f
    cross join m_cuts as m
),

-- The 125 R x F x M cells with their code ('543') and segment from the score map (the
-- matching row with the lowest priority wins; the map is on R and F only).
scores as (
    select 1 as s union all select 2 union all select 3 union all select 4 union all select 5
),

cells as (
    select r.s as r_score, f.s as f_score, m.s as m_score
    from scores as r
    cross join scores as f
    cross join scores as m
),

cell_segments as (
    select r_score, f_score, m_score, rfm_score, segment, segment_id
    from (
        select
            c.r_score,
            c.f_score,
            c.m_score,
            cast(c.r_score as varchar) || cast(c.f_score as varchar) || cast(c.m_score as varchar) as rfm_score,
            m.segment,
            m.segment_id,
            row_number() over (partition by c.r_score, c.f_score, c.m_score order by m.priority, m.segment_id) as pick
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
        -- The features later steps read (K-means, the BTYD models, the wide table); the
        -- calibration split stays in customer_features (btyd_backtest reads it there).
        s.customer_id,
        s.recency_days,
        s.tenure_days,
        s.frequency,
        s.monetary,
        s.x,
        s.t_x,
        s.t,
        s.mean_repeat_spend,
        s.r_score,
        s.f_score,
        s.m_score,
        g.rfm_score,
        g.segment,
        g.segment_id
    -- The 125-row lookup first: DataFusion builds its hash table from the first table.
    from cell_segments as g
    join scored as s
      on s.r_score = g.r_score and s.f_score = g.f_score and s.m_score = g.m_score
)

select * from final
