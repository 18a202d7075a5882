//! `clvflow_partition_value(value, 'column')`: `value` unchanged, or an error naming the
//! column when a value is NULL or an empty string: such values cannot name a Hive partition
//! folder (DataFusion 55 would file a NULL number under `p=0`). The output writer wraps
//! partition columns in it, so the check happens while the rows stream to the files, without
//! computing the step a second time. A DATE comes back as its folder name (`YYYY-MM-DD`, as
//! DataFusion writes it) in a dictionary: DataFusion's writer otherwise formats the date of
//! every row again (about 1 s of a 3M-row write partitioned by `run_date`), while a
//! dictionary's strings are only looked up. The writer records the column as a DATE still.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, PrimitiveArray, StringDictionaryBuilder};
use datafusion::arrow::datatypes::{DataType, Date32Type, Int32Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// The name of the partition-value check (see the module docs).
pub const PARTITION_VALUE: &str = "clvflow_partition_value";

/// `clvflow_partition_value(value, 'column')`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PartitionValue {
    signature: Signature,
}

impl PartitionValue {
    pub(super) fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for PartitionValue {
    fn name(&self) -> &str {
        PARTITION_VALUE
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types.first() {
            Some(DataType::Date32) => Ok(date_folder_type()),
            Some(t) => Ok(t.clone()),
            None => plan_err!("{PARTITION_VALUE}(value, 'column') takes 2 arguments"),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let column = match args.args.get(1) {
            Some(ColumnarValue::Scalar(ScalarValue::Utf8(Some(c)))) => c.clone(),
            _ => return exec_err!("{PARTITION_VALUE}: the second argument must be a column name"),
        };
        let Some(value) = args.args.into_iter().next() else {
            return exec_err!("{PARTITION_VALUE}: no value");
        };
        let array = value.to_array(args.number_rows)?;
        if array.null_count() > 0 {
            return exec_err!(
                "partition column `{column}` has NULL values; set `null_partition_value: __HIVE_DEFAULT_PARTITION__` on this output to keep them in that folder, or filter or fill them in the step's SQL"
            );
        }
        let empty = match array.data_type() {
            DataType::Utf8 => array.as_string::<i32>().iter().any(|v| v == Some("")),
            DataType::LargeUtf8 => array.as_string::<i64>().iter().any(|v| v == Some("")),
            DataType::Utf8View => array.as_string_view().iter().any(|v| v == Some("")),
            _ => false,
        };
        if empty {
            return exec_err!(
                "partition column `{column}` has empty values, which cannot be a folder name; map them in the step's SQL (e.g. COALESCE(NULLIF({column}, ''), 'unknown'))"
            );
        }
        if array.data_type() == &DataType::Date32 {
            return Ok(ColumnarValue::Array(date_folders(array.as_primitive())?));
        }
        Ok(match value {
            ColumnarValue::Scalar(_) => ColumnarValue::Array(array),
            array @ ColumnarValue::Array(_) => array,
        })
    }
}

/// What `clvflow_partition_value` returns for a DATE.
pub fn date_folder_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Dates (no NULLs) as a dictionary of their folder names, formatted once per run of equal
/// dates, exactly as DataFusion 55's writer formats a DATE partition value.
fn date_folders(dates: &PrimitiveArray<Date32Type>) -> Result<ArrayRef> {
    // Days from 0001-01-01 (chrono's "common era" day 1) to 1970-01-01.
    const EPOCH_DAYS_FROM_CE: i32 = 719_163;
    let mut builder = StringDictionaryBuilder::<Int32Type>::new();
    let values = dates.values();
    let mut start = 0;
    while start < values.len() {
        let day = values[start];
        let run = values[start..].iter().take_while(|d| **d == day).count();
        let Some(date) = chrono::NaiveDate::from_num_days_from_ce_opt(EPOCH_DAYS_FROM_CE + day)
        else {
            return exec_err!("{PARTITION_VALUE}: day {day} is not a representable date");
        };
        builder.append_n(date.format("%Y-%m-%d").to_string(), run)?;
        start += run;
    }
    Ok(Arc::new(builder.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DATE partition value is its folder name, as arrow's own cast formats the date, one
    /// dictionary entry per distinct date.
    #[test]
    fn date_partition_values_are_folder_names_in_a_dictionary() {
        use datafusion::arrow::array::{ArrayAccessor, Date32Array, DictionaryArray, StringArray};
        use datafusion::arrow::compute::cast;
        let days = vec![20_414, 20_414, 20_414, 0, 0, -1, 20_414, 2_932_896];
        let dates = Date32Array::from(days.clone());
        let got = date_folders(&dates).unwrap();
        assert_eq!(got.data_type(), &date_folder_type());
        let dict = got
            .as_any()
            .downcast_ref::<DictionaryArray<Int32Type>>()
            .unwrap();
        let names = dict.downcast_dict::<StringArray>().unwrap();
        let want = cast(&dates, &DataType::Utf8).unwrap();
        let want = want.as_string::<i32>();
        for (i, day) in days.iter().enumerate() {
            assert_eq!(names.value(i), want.value(i), "day {day}");
        }
        assert_eq!(names.value(0), "2025-11-22");
        assert_eq!(dict.values().len(), 4);
    }
}
