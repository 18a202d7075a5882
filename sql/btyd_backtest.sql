-- The calibration/holdout split of customer_features under the column names the CLV step's
-- `backtest` reads: the model is refitted on the history up to the cut-off,
-- {{ params.holdout_weeks }} weeks before the run date, and must predict the purchase days after it.
-- Customers whose first purchase is after the cut-off are left out. Time unit: weeks.
--   x, t_x, t      the BTYD summary as of the cut-off
--   x_holdout      purchase days from the cut-off to the run date (what the model must predict)
--   holdout_weeks  length of the holdout period
with features as (
    select * from customer_features
),

final as (
    select
        customer_id,
        x_calibration as x,
        t_x_calibration as t_x,
        t_calibration as t,
        x_holdout,
        cast({{ params.holdout_weeks }} as double) as holdout_weeks
    from features
    where x_calibration is not null
)

select * from final
