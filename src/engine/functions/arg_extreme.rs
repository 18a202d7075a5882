//! `arg_min(value, key)` / `arg_max(value, key)` (aliases `min_by` / `max_by`, as in DuckDB):
//! the `value` of the row with the smallest / largest `key` in the group. Used, for example, to
//! take a customer's first purchase day's spend in the same pass that aggregates all days,
//! instead of joining the day table back to itself.
//!
//! Rules (the same answer on every engine and every partitioning): rows where `value` or `key`
//! is NULL are skipped; the result is NULL for a group with no such row; when several rows share
//! the extreme key, the smallest value among them is returned (DuckDB picks any one of them —
//! give the key a tie-breaker when that matters). `value` is any number and the result is a
//! DOUBLE; `key` is a number, date or timestamp.
//!
//! Grouped aggregation uses a [`GroupsAccumulator`] on flat vectors (one slot per group), so the
//! function costs about what `min` costs.

use std::fmt::Debug;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, PrimitiveArray,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, DataType, Field, FieldRef, Float64Type, Int64Type,
};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Extreme {
    Min,
    Max,
}

/// `arg_min` or `arg_max`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ArgExtreme {
    which: Extreme,
    signature: Signature,
    aliases: Vec<String>,
}

impl ArgExtreme {
    pub(super) fn new(which: Extreme) -> Self {
        let alias = match which {
            Extreme::Min => "min_by",
            Extreme::Max => "max_by",
        };
        Self {
            which,
            signature: Signature::user_defined(Volatility::Immutable),
            aliases: vec![alias.to_string()],
        }
    }
}

/// The key's type after coercion: integers, dates and timestamps compare as Int64, floats and
/// decimals as Float64.
fn key_type(t: &DataType) -> Option<DataType> {
    use DataType as D;
    match t {
        D::Int8 | D::Int16 | D::Int32 | D::Int64 | D::UInt8 | D::UInt16 | D::UInt32 => {
            Some(D::Int64)
        }
        D::Date32 | D::Date64 | D::Timestamp(..) => Some(D::Int64),
        D::UInt64 | D::Float16 | D::Float32 | D::Float64 | D::Decimal128(..) => Some(D::Float64),
        D::Null => Some(D::Int64),
        _ => None,
    }
}

fn is_number(t: &DataType) -> bool {
    t.is_numeric() || *t == DataType::Null
}

impl AggregateUDFImpl for ArgExtreme {
    fn name(&self) -> &str {
        match self.which {
            Extreme::Min => "arg_min",
            Extreme::Max => "arg_max",
        }
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let [value, key] = arg_types else {
            return plan_err!(
                "{}(value, key) takes 2 arguments, got {}",
                self.name(),
                arg_types.len()
            );
        };
        if !is_number(value) {
            return plan_err!(
                "{}(value, key): value must be a number, got {value}",
                self.name()
            );
        }
        let Some(k) = key_type(key) else {
            return plan_err!(
                "{}(value, key): key must be a number, date or timestamp, got {key}",
                self.name()
            );
        };
        Ok(vec![DataType::Float64, k])
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let key = args
            .input_fields
            .get(1)
            .map(|f| f.data_type().clone())
            .unwrap_or(DataType::Int64);
        Ok(vec![
            Arc::new(Field::new(
                format!("{}[value]", args.name),
                DataType::Float64,
                true,
            )),
            Arc::new(Field::new(format!("{}[key]", args.name), key, true)),
        ])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        match args.expr_fields.get(1).map(|f| f.data_type()) {
            Some(DataType::Float64) => Ok(Box::new(Single::<Float64Type>::new(self.which))),
            Some(DataType::Int64) => Ok(Box::new(Single::<Int64Type>::new(self.which))),
            other => exec_err!("{}: unexpected key type {other:?}", self.name()),
        }
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        match args.expr_fields.get(1).map(|f| f.data_type()) {
            Some(DataType::Float64) => Ok(Box::new(Groups::<Float64Type>::new(self.which))),
            Some(DataType::Int64) => Ok(Box::new(Groups::<Int64Type>::new(self.which))),
            other => exec_err!("{}: unexpected key type {other:?}", self.name()),
        }
    }
}

/// Whether (key, value) should replace the current (best_key, best_value).
#[inline]
fn better<K: PartialOrd>(which: Extreme, key: K, value: f64, best_key: K, best_value: f64) -> bool {
    match key.partial_cmp(&best_key) {
        Some(std::cmp::Ordering::Less) => which == Extreme::Min,
        Some(std::cmp::Ordering::Greater) => which == Extreme::Max,
        Some(std::cmp::Ordering::Equal) => value < best_value,
        None => false,
    }
}

fn args<K: ArrowPrimitiveType>(values: &[ArrayRef]) -> Result<(&Float64Array, &PrimitiveArray<K>)> {
    let (Some(v), Some(k)) = (values.first(), values.get(1)) else {
        return exec_err!("arg_min/arg_max: expected 2 input arrays");
    };
    match (
        v.as_primitive_opt::<Float64Type>(),
        k.as_primitive_opt::<K>(),
    ) {
        (Some(v), Some(k)) => Ok((v, k)),
        _ => exec_err!(
            "arg_min/arg_max: unexpected input types {} and {}",
            v.data_type(),
            k.data_type()
        ),
    }
}

/// One slot per group: the best (key, value) seen so far.
struct Groups<K: ArrowPrimitiveType> {
    which: Extreme,
    values: Vec<f64>,
    keys: Vec<K::Native>,
    seen: Vec<bool>,
}

impl<K: ArrowPrimitiveType> Groups<K> {
    fn new(which: Extreme) -> Self {
        Self {
            which,
            values: Vec::new(),
            keys: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn resize(&mut self, n: usize) {
        self.values.resize(n, 0.0);
        self.keys.resize(n, K::Native::default());
        self.seen.resize(n, false);
    }

    fn offer(&mut self, g: usize, key: K::Native, value: f64)
    where
        K::Native: PartialOrd,
    {
        if !self.seen[g] || better(self.which, key, value, self.keys[g], self.values[g]) {
            self.seen[g] = true;
            self.keys[g] = key;
            self.values[g] = value;
        }
    }

    fn accumulate(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        let (v, k) = args::<K>(values)?;
        let has_nulls = v.null_count() > 0 || k.null_count() > 0;
        let (vs, ks) = (v.values(), k.values());
        for (i, &g) in group_indices.iter().enumerate() {
            if let Some(f) = opt_filter
                && !(f.is_valid(i) && f.value(i))
            {
                continue;
            }
            if has_nulls && (v.is_null(i) || k.is_null(i)) {
                continue;
            }
            self.offer(g, ks[i], vs[i]);
        }
        Ok(())
    }

    fn take(&mut self, emit_to: EmitTo) -> (Vec<f64>, Vec<K::Native>, NullBuffer) {
        let values = emit_to.take_needed(&mut self.values);
        let keys = emit_to.take_needed(&mut self.keys);
        let seen = emit_to.take_needed(&mut self.seen);
        (values, keys, NullBuffer::from(seen))
    }
}

impl<K: ArrowPrimitiveType + Send> GroupsAccumulator for Groups<K>
where
    K::Native: PartialOrd,
{
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.accumulate(values, group_indices, opt_filter, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let (values, _, nulls) = self.take(emit_to);
        Ok(Arc::new(Float64Array::new(values.into(), Some(nulls))))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let (values, keys, nulls) = self.take(emit_to);
        Ok(vec![
            Arc::new(Float64Array::new(values.into(), Some(nulls.clone()))),
            Arc::new(PrimitiveArray::<K>::new(keys.into(), Some(nulls))),
        ])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        // A state row is (value, key), NULL for a group that saw nothing: the same as input.
        self.accumulate(values, group_indices, None, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let (v, k) = args::<K>(values)?;
        let mut valid = NullBuffer::union(v.nulls(), k.nulls());
        if let Some(f) = opt_filter {
            let keep: NullBuffer = f.iter().map(|b| b == Some(true)).collect();
            valid = NullBuffer::union(valid.as_ref(), Some(&keep));
        }
        Ok(vec![
            Arc::new(Float64Array::new(v.values().clone(), valid.clone())),
            Arc::new(
                PrimitiveArray::<K>::new(k.values().clone(), valid)
                    .with_data_type(k.data_type().clone()),
            ),
        ])
    }

    fn size(&self) -> usize {
        self.values.capacity() * size_of::<f64>()
            + self.keys.capacity() * size_of::<K::Native>()
            + self.seen.capacity()
    }
}

/// The ungrouped form (`SELECT arg_min(v, k) FROM t`).
#[derive(Debug)]
struct Single<K: ArrowPrimitiveType> {
    which: Extreme,
    best: Option<(K::Native, f64)>,
}

impl<K: ArrowPrimitiveType> Single<K> {
    fn new(which: Extreme) -> Self {
        Self { which, best: None }
    }

    fn consume(&mut self, values: &[ArrayRef]) -> Result<()>
    where
        K::Native: PartialOrd,
    {
        let (v, k) = args::<K>(values)?;
        for i in 0..v.len() {
            if v.is_null(i) || k.is_null(i) {
                continue;
            }
            let (key, value) = (k.value(i), v.value(i));
            match self.best {
                Some((bk, bv)) if !better(self.which, key, value, bk, bv) => {}
                _ => self.best = Some((key, value)),
            }
        }
        Ok(())
    }
}

impl<K: ArrowPrimitiveType + Send + Sync + Debug> Accumulator for Single<K>
where
    K::Native: PartialOrd,
{
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.consume(values)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(self.best.map(|(_, v)| v)))
    }

    fn size(&self) -> usize {
        size_of::<Self>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let key = PrimitiveArray::<K>::from_iter(std::iter::once(self.best.map(|(k, _)| k)));
        Ok(vec![
            ScalarValue::Float64(self.best.map(|(_, v)| v)),
            ScalarValue::try_from_array(&key, 0)?,
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.consume(states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::Schema;
    use datafusion::datasource::MemTable;

    /// Runs `sql` over a table t(g, v, k) split over two partitions (so partial states merge),
    /// once normally and once with partial aggregation skipped from the first row (so input
    /// rows become states through `convert_to_state`); both must agree.
    async fn query(sql: &str) -> Vec<(i64, Option<f64>)> {
        let normal = query_with(sql, false).await;
        assert_eq!(normal, query_with(sql, true).await, "{sql}");
        normal
    }

    async fn query_with(sql: &str, skip_partial: bool) -> Vec<(i64, Option<f64>)> {
        let ctx = crate::engine::functions::test_session(2, skip_partial);
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Int64, false),
            Field::new("v", DataType::Float64, true),
            Field::new("k", DataType::Int64, true),
        ]));
        let batch = |g: Vec<i64>, v: Vec<Option<f64>>, k: Vec<Option<i64>>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(g)),
                    Arc::new(Float64Array::from(v)),
                    Arc::new(Int64Array::from(k)),
                ],
            )
            .unwrap()
        };
        let p1 = batch(
            vec![1, 1, 2, 3, 4],
            vec![Some(10.0), Some(20.0), None, Some(5.0), Some(7.0)],
            vec![Some(5), Some(3), Some(1), Some(9), Some(2)],
        );
        let p2 = batch(
            vec![1, 2, 3, 4, 5],
            vec![Some(30.0), Some(40.0), Some(6.0), Some(1.0), Some(8.0)],
            vec![Some(4), Some(2), Some(9), Some(2), None],
        );
        // One-row batches: partial aggregation decides to skip after the first batch.
        let rows = |b: RecordBatch| (0..b.num_rows()).map(|i| b.slice(i, 1)).collect::<Vec<_>>();
        let table = MemTable::try_new(schema.clone(), vec![rows(p1), rows(p2)]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut out = Vec::new();
        for b in batches {
            let g = b.column(0).as_primitive::<Int64Type>();
            let v = b.column(1).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                out.push((g.value(i), v.is_valid(i).then(|| v.value(i))));
            }
        }
        out.sort_by_key(|r| r.0);
        out
    }

    #[tokio::test]
    async fn value_at_the_extreme_key_per_group() {
        // Group 1: keys 5, 3, 4 -> min at 3 (20), max at 5 (10). Group 2: the NULL value is
        // skipped -> only (40, key 2). Group 3: tie on key 9 -> the smaller value, 5, for both.
        // Group 4: tie on key 2 -> 1. Group 5: NULL key only -> NULL.
        let min = query("select g, arg_min(v, k) from t group by g").await;
        assert_eq!(
            min,
            vec![
                (1, Some(20.0)),
                (2, Some(40.0)),
                (3, Some(5.0)),
                (4, Some(1.0)),
                (5, None)
            ]
        );
        let max = query("select g, max_by(v, k) from t group by g").await;
        assert_eq!(
            max,
            vec![
                (1, Some(10.0)),
                (2, Some(40.0)),
                (3, Some(5.0)),
                (4, Some(1.0)),
                (5, None)
            ]
        );
        let filtered =
            query("select g, arg_min(v, k) filter (where k <> 3) from t group by g").await;
        assert_eq!(filtered[0], (1, Some(30.0)));
    }

    #[tokio::test]
    async fn ungrouped_and_timestamp_keys() {
        // Key 2 is the smallest valid key, with values 7, 40 and 1.
        let all = query("select 0, arg_min(v, k) from t").await;
        assert_eq!(all, vec![(0, Some(1.0))]);
        // Timestamps compare as their instants: key 9 is the latest, with values 5 and 6.
        let ts = query("select 0, arg_max(v, to_timestamp(k)) from t").await;
        assert_eq!(ts, vec![(0, Some(5.0))]);
        let grouped = query("select g, arg_max(v, to_timestamp(k)) from t group by g").await;
        assert_eq!(grouped[0], (1, Some(10.0)));
    }
}
