-- Dynamic LTV: value curves per acquisition cohort (the calendar month of signup, UTC) and
-- acquisition channel. One row per cohort, channel and point of {{ params.ltv_days }} (days after
-- each customer's own signup):
--   customers                  acquired (signup before the run date)
--   observed_days              whole days every customer of the cohort has been observed
--                              (from the latest signup of the cohort to the run date)
--   revenue_per_customer       cumulative net revenue of the orders in the first `days` days
--                              (day 0 = the signup day's first 24 hours), per acquired customer
--   gross_profit_per_customer  the same times params.gross_margin
--   repeat_share               share of the acquired customers with a second order in those days
--   (the three are NULL where the cohort is not old enough: observed_days < days)
--   cac                        the channel's average acquisition cost (all its customers)
--   payback_day                the first day at which cumulative gross profit per customer
--                              reaches cac, within observed_days; NULL when not (yet)
--   predicted_365_per_customer realized gross profit per customer in the first min(365,
--                              observed_days) days + for a cohort younger than 365 days the CLV
--                              model's prediction for the rest: mean predicted_clv (its 12-month
--                              horizon) times (365 - observed_days) / 365
--   below_cac                  predicted_365_per_customer < cac
-- Orders before signup are not counted (cohort_daily). Runs unchanged on DuckDB.
with points as (
    select cast(trim(d) as bigint) as days
    from (select unnest(string_to_array('{{ params.ltv_days }}', ',')) as d) as p
),

acquired as (
    select
        customer_id,
        signup_ts,
        cast(date_trunc('month', signup_ts) as date) as cohort_month,
        acquisition_channel as channel,
        acquisition_cost
    from customers
    where customer_id is not null
      and signup_ts < timestamp '{{ run_date }} 00:00:00'
),

channel_cac as (
    select channel, avg(acquisition_cost) as cac
    from acquired
    group by channel
),

cohorts as (
    select
        cohort_month,
        channel,
        count(*) as customers,
        cast(floor((date_part('epoch', timestamp '{{ run_date }} 00:00:00') - max(date_part('epoch', signup_ts))) / 86400) as bigint) as observed_days
    from acquired
    group by cohort_month, channel
),

-- cohort_daily may hold a cohort, channel and day once per bucket of customers (a split run:
-- partial sums), so its rows are summed again (once each where it ran whole).
daily as (
    select cohort_month, channel, day, sum(revenue) as revenue, sum(second_buyers) as second_buyers
    from cohort_daily
    group by cohort_month, channel, day
),

cumulative as (
    select
        cohort_month,
        channel,
        day,
        sum(revenue) over (partition by cohort_month, channel order by day rows between unbounded preceding and current row) as revenue_to_day
    from daily
),

payback as (
    select u.cohort_month, u.channel, min(u.day) as payback_day
    from cumulative as u
    join cohorts as c on c.cohort_month = u.cohort_month and c.channel = u.channel
    join channel_cac as k on k.channel = u.channel
    where u.revenue_to_day * {{ params.gross_margin }} / c.customers >= k.cac
      and u.day < c.observed_days
    group by u.cohort_month, u.channel
),

-- Revenue and second orders in the first `days` days (daily: one row per cohort, channel and day
-- with an order).
at_points as (
    select c.cohort_month, c.channel, p.days,
           coalesce(sum(d.revenue), 0) as revenue,
           coalesce(sum(d.second_buyers), 0) as repeat_buyers
    from cohorts as c
    cross join points as p
    left join daily as d
      on d.cohort_month = c.cohort_month and d.channel = c.channel and d.day < p.days
    group by c.cohort_month, c.channel, p.days
),

realized as (
    select c.cohort_month, c.channel, coalesce(sum(d.revenue), 0) as revenue
    from cohorts as c
    left join daily as d
      on d.cohort_month = c.cohort_month and d.channel = c.channel and d.day < least(365, c.observed_days)
    group by c.cohort_month, c.channel
),

predicted as (
    select a.cohort_month, a.channel, avg(coalesce(v.predicted_clv, 0)) as predicted_clv
    from acquired as a
    left join customer_value as v on v.customer_id = a.customer_id
    group by a.cohort_month, a.channel
),

final as (
    select
        date '{{ run_date }}' as run_date,
        c.cohort_month,
        c.channel as acquisition_channel,
        x.days,
        c.customers,
        c.observed_days,
        case when c.observed_days >= x.days then round(x.revenue / c.customers, 2) end as revenue_per_customer,
        case when c.observed_days >= x.days then round(x.revenue * {{ params.gross_margin }} / c.customers, 2) end as gross_profit_per_customer,
        case when c.observed_days >= x.days then round(cast(x.repeat_buyers as double) / c.customers, 4) end as repeat_share,
        round(k.cac, 2) as cac,
        b.payback_day,
        round(r.revenue * {{ params.gross_margin }} / c.customers
              + case when c.observed_days < 365 then q.predicted_clv * (365 - c.observed_days) / 365.0 else 0 end, 2) as predicted_365_per_customer,
        r.revenue * {{ params.gross_margin }} / c.customers
              + case when c.observed_days < 365 then q.predicted_clv * (365 - c.observed_days) / 365.0 else 0 end < k.cac as below_cac
    from cohorts as c
    join at_points as x on x.cohort_month = c.cohort_month and x.channel = c.channel
    join channel_cac as k on k.channel = c.channel
    join realized as r on r.cohort_month = c.cohort_month and r.channel = c.channel
    join predicted as q on q.cohort_month = c.cohort_month and q.channel = c.channel
    left join payback as b on b.cohort_month = c.cohort_month and b.channel = c.channel
)

select * from final order by cohort_month, acquisition_channel, days
