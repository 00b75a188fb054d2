//! Storage work off the actors' thread.

use kiln_persistence::StoreError;

/// Runs a storage job on tokio's blocking pool and waits for it; a job that
/// panicked comes back as an error instead of taking the actor down.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Corrupt {
            path: Default::default(),
            what: "storage task".into(),
            detail: e.to_string(),
        }),
    }
}
