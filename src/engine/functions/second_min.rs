//! `second_min(x)`: the second smallest value of an integer `x` in the group, counting repeats
//! (`second_min` of 3, 3, 5 is 3), NULL for a group with fewer than two non-NULL values. The
//! result is a BIGINT. DuckDB spells it `min(x, 2)[2]`.
//!
//! Used, for example, to find each customer's second order day in the same hash aggregation that
//! sums the days, instead of sorting every order by customer and time for a window function
//! (DataFusion 55 sorts the whole input for a window without a cheap partition key).
//!
//! Grouped aggregation uses a [`GroupsAccumulator`] on flat vectors (two slots and a count per
//! group), so the function costs about what `min` costs. The partial state is the two smallest
//! values (NULL where not seen).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

/// `second_min`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SecondMin {
    signature: Signature,
}

impl SecondMin {
    pub(super) fn new() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for SecondMin {
    fn name(&self) -> &str {
        "second_min"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        use DataType as D;
        match arg_types {
            [
                D::Int8
                | D::Int16
                | D::Int32
                | D::Int64
                | D::UInt8
                | D::UInt16
                | D::UInt32
                | D::Null,
            ] => Ok(vec![D::Int64]),
            [other] => plan_err!("second_min(x): x must be an integer, got {other}"),
            _ => plan_err!("second_min(x) takes 1 argument, got {}", arg_types.len()),
        }
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format!("{}[first]", args.name),
                DataType::Int64,
                true,
            )),
            Arc::new(Field::new(
                format!("{}[second]", args.name),
                DataType::Int64,
                true,
            )),
        ])
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Single::default()))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups::default()))
    }
}

/// The two smallest values seen, `n` of them (0, 1 or 2).
#[derive(Debug, Clone, Copy, Default)]
struct Two {
    first: i64,
    second: i64,
    n: u8,
}

impl Two {
    #[inline]
    fn offer(&mut self, v: i64) {
        match self.n {
            0 => {
                self.first = v;
                self.n = 1;
            }
            1 => {
                if v < self.first {
                    self.second = self.first;
                    self.first = v;
                } else {
                    self.second = v;
                }
                self.n = 2;
            }
            _ => {
                if v < self.first {
                    self.second = self.first;
                    self.first = v;
                } else if v < self.second {
                    self.second = v;
                }
            }
        }
    }
}

fn int64(values: &[ArrayRef], i: usize) -> Result<&Int64Array> {
    match values
        .get(i)
        .and_then(|a| a.as_primitive_opt::<Int64Type>())
    {
        Some(a) => Ok(a),
        None => exec_err!("second_min: expected a BIGINT array at {i}"),
    }
}

/// Offers every valid value of `a` (where `filter`, if any, is true) to `slot(i)`.
fn offer_all(a: &Int64Array, filter: Option<&BooleanArray>, mut slot: impl FnMut(usize, i64)) {
    let values = a.values();
    if a.null_count() == 0 && filter.is_none() {
        for (i, &v) in values.iter().enumerate() {
            slot(i, v);
        }
        return;
    }
    for (i, &v) in values.iter().enumerate() {
        let kept = filter.is_none_or(|f| f.is_valid(i) && f.value(i));
        if kept && a.is_valid(i) {
            slot(i, v);
        }
    }
}

/// One slot per group.
#[derive(Default)]
struct Groups {
    slots: Vec<Two>,
}

impl Groups {
    fn take(&mut self, emit_to: EmitTo) -> Vec<Two> {
        emit_to.take_needed(&mut self.slots)
    }
}

fn column(slots: &[Two], value: impl Fn(&Two) -> i64, valid: impl Fn(&Two) -> bool) -> ArrayRef {
    let nulls: NullBuffer = slots.iter().map(valid).collect();
    Arc::new(Int64Array::new(
        slots.iter().map(value).collect(),
        Some(nulls),
    ))
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.slots.resize(total_num_groups, Two::default());
        let slots = &mut self.slots;
        offer_all(int64(values, 0)?, opt_filter, |i, v| {
            slots[group_indices[i]].offer(v)
        });
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let slots = self.take(emit_to);
        Ok(column(&slots, |t| t.second, |t| t.n == 2))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let slots = self.take(emit_to);
        Ok(vec![
            column(&slots, |t| t.first, |t| t.n >= 1),
            column(&slots, |t| t.second, |t| t.n == 2),
        ])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        // A state row is the two smallest of a part of the group, each NULL when not seen:
        // offering both is merging them.
        self.slots.resize(total_num_groups, Two::default());
        for k in 0..2 {
            let slots = &mut self.slots;
            offer_all(int64(values, k)?, None, |i, v| {
                slots[group_indices[i]].offer(v)
            });
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let a = int64(values, 0)?;
        let mut valid = a.nulls().cloned();
        if let Some(f) = opt_filter {
            let keep: NullBuffer = f.iter().map(|b| b == Some(true)).collect();
            valid = NullBuffer::union(valid.as_ref(), Some(&keep));
        }
        Ok(vec![
            Arc::new(Int64Array::new(a.values().clone(), valid)),
            Arc::new(Int64Array::new_null(a.len())),
        ])
    }

    fn size(&self) -> usize {
        self.slots.capacity() * size_of::<Two>()
    }
}

/// The ungrouped form (`SELECT second_min(x) FROM t`).
#[derive(Debug, Default)]
struct Single {
    two: Two,
}

impl Accumulator for Single {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        offer_all(int64(values, 0)?, None, |_, v| self.two.offer(v));
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(
            (self.two.n == 2).then_some(self.two.second),
        ))
    }

    fn size(&self) -> usize {
        size_of::<Self>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let t = self.two;
        Ok(vec![
            ScalarValue::Int64((t.n >= 1).then_some(t.first)),
            ScalarValue::Int64((t.n == 2).then_some(t.second)),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        for k in 0..2 {
            offer_all(int64(states, k)?, None, |_, v| self.two.offer(v));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::RecordBatch;
    use datafusion::arrow::datatypes::Schema;
    use datafusion::datasource::MemTable;

    /// A deterministic shuffle of 0..n.
    fn shuffled(n: usize, seed: u64) -> Vec<usize> {
        let mut s = seed | 1;
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.swap(i, (s % (i as u64 + 1)) as usize);
        }
        v
    }

    /// Runs `sql` over t(g, x) with `rows` dealt over 3 partitions in one-row batches, with
    /// partial aggregation kept or skipped from the first row (so rows become states through
    /// `convert_to_state`).
    async fn query(
        rows: &[(i64, Option<i64>)],
        sql: &str,
        skip_partial: bool,
    ) -> Vec<(i64, Option<i64>)> {
        let ctx = crate::engine::functions::test_session(3, skip_partial);
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Int64, false),
            Field::new("x", DataType::Int64, true),
        ]));
        let mut parts = vec![Vec::new(), Vec::new(), Vec::new()];
        for (i, &(g, x)) in rows.iter().enumerate() {
            let b = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(vec![g])),
                    Arc::new(Int64Array::from(vec![x])),
                ],
            )
            .unwrap();
            parts[i % 3].push(b);
        }
        let table = MemTable::try_new(schema, parts).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut out = Vec::new();
        for b in batches {
            let g = b.column(0).as_primitive::<Int64Type>();
            let v = b.column(1).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                out.push((g.value(i), v.is_valid(i).then(|| v.value(i))));
            }
        }
        out.sort();
        out
    }

    /// The reference: sort each group's non-NULL values and take the second.
    fn by_sorting(rows: &[(i64, Option<i64>)]) -> Vec<(i64, Option<i64>)> {
        let mut groups: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
        for &(g, x) in rows {
            let values = groups.entry(g).or_default();
            values.extend(x);
        }
        groups
            .into_iter()
            .map(|(g, mut v)| {
                v.sort();
                (g, v.get(1).copied())
            })
            .collect()
    }

    #[tokio::test]
    async fn the_second_smallest_value_per_group_counting_repeats() {
        // g 1: 3, 3, 5 -> 3 (repeats count); g 2: one value -> NULL; g 3: only NULLs -> NULL;
        // g 4: 9, NULL, 2, 7 -> 7; g 5: negative and i64 extremes.
        let rows = vec![
            (1, Some(5)),
            (1, Some(3)),
            (1, Some(3)),
            (2, Some(4)),
            (3, None),
            (3, None),
            (4, Some(9)),
            (4, None),
            (4, Some(2)),
            (4, Some(7)),
            (5, Some(i64::MAX)),
            (5, Some(i64::MIN)),
            (5, Some(-1)),
        ];
        let want = vec![
            (1, Some(3)),
            (2, None),
            (3, None),
            (4, Some(7)),
            (5, Some(-1)),
        ];
        for skip in [false, true] {
            let got = query(&rows, "select g, second_min(x) from t group by g", skip).await;
            assert_eq!(got, want, "skip partial aggregation: {skip}");
        }
        let filtered = query(
            &rows,
            "select g, second_min(x) filter (where x <> 3) from t group by g",
            true,
        )
        .await;
        assert_eq!(filtered[0], (1, None));
        let all = query(&rows, "select 0, second_min(x) from t", false).await;
        assert_eq!(all, vec![(0, Some(-1))]);
    }

    #[tokio::test]
    async fn equals_sorting_each_group_on_shuffled_data() {
        // 400 groups of 0..6 values drawn from a small range (many repeats), in shuffled order.
        let mut rows = Vec::new();
        for g in 0..400i64 {
            for k in 0..(g % 7) {
                let x = (g * 31 + k * 17) % 11;
                rows.push((g, if (g + k) % 5 == 0 { None } else { Some(x - 5) }));
            }
        }
        let rows: Vec<_> = shuffled(rows.len(), 42)
            .into_iter()
            .map(|i| rows[i])
            .collect();
        let want = by_sorting(&rows);
        for skip in [false, true] {
            let got = query(&rows, "select g, second_min(x) from t group by g", skip).await;
            assert_eq!(got, want, "skip partial aggregation: {skip}");
        }
    }
}
