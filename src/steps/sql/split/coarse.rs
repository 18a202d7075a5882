//! Reading a split step result in coarser buckets, and the session a split step runs its buckets
//! on.

use super::*;

/// A session like `base` whose tables are its own (the default schema's, copied), so that
/// replacing one for a bucket leaves `base`'s alone.
pub(super) async fn overlay(base: &SessionContext) -> Result<SessionContext> {
    let state = base.state();
    let names = state.config().options().catalog.clone();
    let schema = MemorySchemaProvider::new();
    if let Some(old) = (state.catalog_list().catalog(&names.default_catalog))
        .and_then(|c| c.schema(&names.default_schema))
    {
        for table in old.table_names() {
            let provider = (old.table(&table).await)
                .map_err(|e| Error::df(format!("copy table `{table}` for a bucket"), e))?;
            if let Some(p) = provider {
                schema
                    .register_table(table.clone(), p)
                    .map_err(|e| Error::df(format!("copy table `{table}` for a bucket"), e))?;
            }
        }
    }
    let catalog = MemoryCatalogProvider::new();
    catalog
        .register_schema(&names.default_schema, Arc::new(schema))
        .map_err(|e| Error::df("a session for the buckets", e))?;
    let list = MemoryCatalogProviderList::new();
    list.register_catalog(names.default_catalog.clone(), Arc::new(catalog));
    let state = SessionStateBuilder::new_from_existing(state)
        .with_catalog_list(Arc::new(list))
        .build();
    Ok(SessionContext::new_with_state(state))
}

/// A step result split by a column, read in coarser buckets: bucket k of `buckets` (which
/// divides the result's count) is its files j with j % buckets == k. For a model step that takes
/// its customers in buckets of the same kind (the rule-based CLV models): one read of each file
/// instead of one filtered read of every file per bucket.
pub struct CoarseBuckets {
    session: SessionContext,
    name: String,
    schema: SchemaRef,
    files: Vec<PathBuf>,
    buckets: usize,
}

impl CoarseBuckets {
    /// `Some` when table `name` on `ctx` is a step result split by `column` in one layer, in a
    /// count that `buckets` divides.
    pub async fn of(
        ctx: &SessionContext,
        name: &str,
        column: &str,
        buckets: usize,
    ) -> Result<Option<Self>> {
        let Ok(provider) = ctx.table_provider(name).await else {
            return Ok(None);
        };
        let Some(t) = provider.downcast_ref::<SpilledTable>() else {
            return Ok(None);
        };
        let files = t.files();
        let (Some((c, count)), Some(paths)) = (files.split_by(), files.single_layer()) else {
            return Ok(None);
        };
        if !c.eq_ignore_ascii_case(column) || buckets == 0 || count % buckets != 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            session: overlay(ctx).await?,
            name: name.to_string(),
            schema: files.schema().clone(),
            files: paths.to_vec(),
            buckets,
        }))
    }

    /// A session on which the table holds only bucket `k`'s rows (every other table as on the
    /// session this was made from).
    pub async fn bucket(&self, k: usize) -> Result<&SessionContext> {
        let err = |e| Error::df(format!("read bucket {k} of `{}`", self.name), e);
        let paths: Vec<String> = (self.files.iter().enumerate())
            .filter(|(j, _)| j % self.buckets == k)
            .map(|(_, p)| p.display().to_string())
            .collect();
        let table = crate::storage::listing::table_of_files(
            &paths,
            crate::storage::listing::Format::Parquet,
            self.schema.clone(),
        )
        .map_err(err)?;
        self.session
            .deregister_table(&self.name)
            .and_then(|_| self.session.register_table(&self.name, table))
            .map_err(err)?;
        Ok(&self.session)
    }
}
