//! Artifacts over HTTP: `PUT /v1/artifacts/{name}` uploads a new version (streamed
//! to disk, never held in memory), `GET` serves this node's copy, `GET
//! /v1/artifacts` lists versions and their holders, `DELETE` retires a version.

use std::sync::Arc;

use actix::Addr;
use actix_web::http::{header, StatusCode};
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use futures::StreamExt;
use kiln_actors::artifact::{ArtifactActor, GetTransfers, Uploaded};
use kiln_actors::control::state::{
    ArtifactCommand, ArtifactVersion, ControlCommand, ControlOutcome,
};
use kiln_actors::control::types::NodeId;
use kiln_actors::control::{ControlPlane, Propose, SharedApplied};
use kiln_persistence::{ArtifactStore, StoreError, Upload};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::{ApiError, ApiState};

/// Largest artifact accepted.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;
/// Upload bytes gathered before one write to disk.
const WRITE_BATCH: usize = 1 << 20;
/// Bytes per read when serving a file.
const READ_BATCH: usize = 256 * 1024;

pub struct ArtifactApi {
    pub actor: Addr<ArtifactActor>,
    pub store: Arc<ArtifactStore>,
    pub applied: SharedApplied,
    pub control: Addr<ControlPlane>,
    pub me: NodeId,
    pub keep_versions: u32,
}

fn api(state: &ApiState) -> Result<&ArtifactApi, ApiError> {
    state
        .artifacts
        .as_ref()
        .ok_or_else(|| ApiError::retry_later("the artifact API is not ready".into()))
}

fn bad_request(msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

fn storage(e: StoreError) -> ApiError {
    ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        format!("cannot store the artifact: {e}"),
    )
}

/// A name is one path segment of printable characters, at most 200 bytes.
/// The artifact name of a `/v1/artifacts/{name}` request, percent-decoded from
/// the raw path: a name that is not UTF-8 once decoded is refused (the router's
/// own decoding replaces such bytes, so `%FF` and `%FE` would name one artifact).
fn name_of(req: &HttpRequest) -> Result<String, ApiError> {
    let raw = req
        .uri()
        .path()
        .strip_prefix("/v1/artifacts/")
        .ok_or_else(|| bad_request("expected /v1/artifacts/{name}".into()))?;
    let name = crate::kv_api::decode_name(raw, "artifact name")?;
    check_name(&name)?;
    Ok(name)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 200
        || name.chars().any(|c| c.is_control() || c == '/')
        || name == "."
        || name == ".."
    {
        return Err(bad_request(
            "an artifact name is 1 to 200 bytes of printable characters without '/', and not '.' or '..'".into(),
        ));
    }
    Ok(())
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("an artifact is at most {MAX_ARTIFACT_BYTES} bytes"),
    )
}

fn content_length(req: &HttpRequest) -> Result<Option<u64>, ApiError> {
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| bad_request("Content-Length is not a number".into())),
    }
}

/// What names this upload to the control plane: the client's
/// `Idempotency-Key` (a retry gets the version the first try got, while it is
/// live), else a fresh id.
fn upload_id(req: &HttpRequest) -> Result<String, ApiError> {
    match req.headers().get("idempotency-key") {
        None => Ok(format!("{:032x}", rand::random::<u128>())),
        Some(v) => match v.to_str().map(str::trim) {
            Ok(k) if !k.is_empty() && k.len() <= 256 => Ok(format!("k:{k}")),
            _ => Err(bad_request(
                "Idempotency-Key must be 1 to 256 characters of text".into(),
            )),
        },
    }
}

/// The SHA-256 a `Content-Digest: sha-256=:<base64>:` header asks for.
fn wanted_digest(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    // The header may come as several lines, each a list (RFC 9110 5.3).
    let mut lines = Vec::new();
    for v in req.headers().get_all("Content-Digest") {
        lines.push(
            v.to_str()
                .map_err(|_| bad_request("Content-Digest is not text".into()))?,
        );
    }
    if lines.is_empty() {
        return Ok(None);
    }
    for item in lines.iter().flat_map(|l| l.split(',')) {
        let item = item.trim();
        if let Some(b64) = item
            .strip_prefix("sha-256=:")
            .and_then(|r| r.strip_suffix(':'))
        {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| bad_request(format!("Content-Digest sha-256 is not base64: {e}")))?;
            if bytes.len() != 32 {
                return Err(bad_request(
                    "Content-Digest sha-256 must be 32 bytes".into(),
                ));
            }
            return Ok(Some(hex::encode(bytes)));
        }
    }
    Err(bad_request(
        "Content-Digest has no sha-256 entry (the only algorithm kiln checks)".into(),
    ))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(storage),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("artifact storage task failed: {e}"),
        )),
    }
}

pub async fn put(
    state: web::Data<ApiState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let name = name_of(&req)?;
    let api = api(&state)?;
    let wanted = wanted_digest(&req)?;
    let upload_id = upload_id(&req)?;
    // Refused before the body is read, so the client sees why.
    if let Some(len) = content_length(&req)? {
        if len > MAX_ARTIFACT_BYTES {
            return Err(too_large());
        }
    }
    let store = api.store.clone();
    let mut upload: Upload = blocking(move || store.upload()).await?;
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    let mut total = 0u64;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| bad_request(format!("cannot read the body: {e}")))?;
        total += chunk.len() as u64;
        if total > MAX_ARTIFACT_BYTES {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
        if buf.len() >= WRITE_BATCH {
            let data = std::mem::replace(&mut buf, Vec::with_capacity(WRITE_BATCH));
            upload = blocking(move || upload.write(&data).map(|()| upload)).await?;
        }
    }
    if total == 0 {
        return Err(bad_request("an artifact cannot be empty".into()));
    }
    let (upload, digests) = blocking(move || {
        upload.write(&buf)?;
        let d = upload.digests();
        Ok((upload, d))
    })
    .await?;
    if let Some(w) = wanted {
        if w != digests.sha256 {
            // Dropping the upload removes its file.
            drop(upload);
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "Content-Digest says sha-256 {w}, the body has {}; nothing was stored",
                    digests.sha256
                ),
            ));
        }
    }
    let store = api.store.clone();
    let (digests, claim) = blocking(move || store.keep_upload(upload)).await?;
    let cmd = ControlCommand::Artifact(ArtifactCommand::Publish {
        name: name.clone(),
        version: ArtifactVersion {
            sha256: digests.sha256.clone(),
            size: digests.size,
            chunks_root: digests.chunks_root(),
            published_ms: kiln_actors::membership::unix_ms(),
            upload: upload_id.clone(),
            holders: Default::default(),
        },
        by: api.me,
        keep: api.keep_versions,
    });
    let version = match api.control.send(Propose(cmd)).await {
        Ok(Ok(ControlOutcome::ArtifactPublished { version })) => version,
        Ok(Ok(ControlOutcome::Rejected { reason })) => {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason))
        }
        Ok(Ok(other)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("the control plane did not assign a version: {other:?}"),
            ))
        }
        Ok(Err(e)) => {
            let retry = if upload_id.starts_with("k:") {
                "retry with the same Idempotency-Key to get that one rather than a second version"
            } else {
                "list the versions (GET /v1/artifacts) before uploading again; an upload with \
                 an Idempotency-Key can be retried safely"
            };
            return Err(ApiError::retry_later(format!(
                "the control plane could not assign a version ({e}); it may have assigned one \
                 all the same: {retry}"
            )));
        }
        Err(e) => return Err(ApiError::retry_later(format!("node is shutting down: {e}"))),
    };
    // The artifact actor announces the version once this node's applied
    // state records it holding it.
    api.actor.do_send(Uploaded {
        name: name.clone(),
        version,
        sha256: digests.sha256.clone(),
        claim,
    });
    tracing::info!(%name, version, size = digests.size, sha256 = %digests.sha256, "artifact version published");
    Ok(HttpResponse::Created().json(json!({
        "name": name,
        "version": version,
        "sha256": digests.sha256,
        "size": digests.size,
    })))
}

#[derive(Debug, Deserialize)]
pub struct VersionQuery {
    version: Option<u64>,
}

/// The version asked for (the newest if none) and what the control plane knows of it.
fn lookup(
    api: &ArtifactApi,
    name: &str,
    version: Option<u64>,
) -> Result<(u64, ArtifactVersion), ApiError> {
    let applied = api
        .applied
        .read()
        .map_err(|_| ApiError::retry_later("control-plane state unavailable".into()))?;
    let entry =
        applied.state.artifacts.get(name).ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, format!("no artifact named {name}"))
        })?;
    let found = match version {
        Some(v) => entry.versions.get(&v).map(|a| (v, a.clone())),
        None => entry
            .versions
            .iter()
            .next_back()
            .map(|(v, a)| (*v, a.clone())),
    };
    found.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            match version {
                Some(v) => format!("artifact {name} has no live version {v}"),
                None => format!("artifact {name} has no live version"),
            },
        )
    })
}

pub async fn get(
    state: web::Data<ApiState>,
    req: HttpRequest,
    query: web::Query<VersionQuery>,
) -> Result<HttpResponse, ApiError> {
    let name = name_of(&req)?;
    let api = api(&state)?;
    let (version, v) = lookup(api, &name, query.version)?;
    if !api.store.has(&v.sha256) {
        let done = api
            .actor
            .send(GetTransfers)
            .await
            .ok()
            .and_then(|ts| ts.into_iter().find(|t| t.sha256 == v.sha256))
            .map(|t| t.bytes_done)
            .unwrap_or(0);
        return Err(ApiError::retry_later(format!(
            "version {version} of {name} is not on this node yet ({done} of {} bytes fetched)",
            v.size
        )));
    }
    let path = api.store.blob_path(&v.sha256);
    let file = match tokio::task::spawn_blocking(move || {
        std::fs::File::open(&path).map_err(|e| (path, e))
    })
    .await
    {
        Ok(Ok(f)) => f,
        // Retired and collected since `lookup`.
        Ok(Err((_, e))) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("version {version} of {name} was retired meanwhile"),
            ))
        }
        Ok(Err((path, e))) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {}: {e}", path.display()),
            ))
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("artifact storage task failed: {e}"),
            ))
        }
    };
    let body = futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut buf = vec![0u8; READ_BATCH];
            let n = file.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((file, buf))
        })
        .await;
        match read {
            Ok(Ok((_, buf))) if buf.is_empty() => None,
            Ok(Ok((file, buf))) => Some((Ok::<_, actix_web::Error>(Bytes::from(buf)), Some(file))),
            Ok(Err(e)) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
            Err(e) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
        }
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/octet-stream"))
        .insert_header((header::ETAG, format!("\"{}\"", v.sha256)))
        .insert_header(("X-Kiln-Artifact-Version", version.to_string()))
        .no_chunking(v.size)
        .streaming(body))
}

pub async fn list(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let api = api(&state)?;
    let transfers = api.actor.send(GetTransfers).await.unwrap_or_default();
    let applied = api
        .applied
        .read()
        .map_err(|_| ApiError::retry_later("control-plane state unavailable".into()))?;
    let mut out = Vec::new();
    for (name, entry) in &applied.state.artifacts {
        let versions: Vec<Value> = entry
            .versions
            .iter()
            .map(|(n, v)| {
                let transfer = transfers.iter().find(|t| t.sha256 == v.sha256);
                let here = if api.store.has(&v.sha256) {
                    "complete"
                } else if transfer.is_some() {
                    "fetching"
                } else {
                    "missing"
                };
                json!({
                    "version": n,
                    "sha256": v.sha256,
                    "size": v.size,
                    "published_ms": v.published_ms,
                    "holders": v.holders.iter()
                        .filter_map(|h| applied.state.peer_of(*h))
                        .collect::<Vec<_>>(),
                    "here": here,
                    "fetched_bytes": if here == "complete" { v.size }
                        else { transfer.map(|t| t.bytes_done).unwrap_or(0) },
                })
            })
            .collect();
        if !versions.is_empty() {
            out.push(json!({"name": name, "versions": versions}));
        }
    }
    Ok(HttpResponse::Ok().json(json!({ "artifacts": out })))
}

pub async fn delete(
    state: web::Data<ApiState>,
    req: HttpRequest,
    query: web::Query<VersionQuery>,
) -> Result<HttpResponse, ApiError> {
    let name = name_of(&req)?;
    let api = api(&state)?;
    let version = query
        .version
        .ok_or_else(|| bad_request("say which version to retire: ?version=N".into()))?;
    let cmd = ControlCommand::Artifact(ArtifactCommand::Retire {
        name: name.clone(),
        version,
    });
    match api.control.send(Propose(cmd)).await {
        Ok(Ok(ControlOutcome::Removed)) => {
            tracing::info!(%name, version, "artifact version retired");
            Ok(HttpResponse::Ok().json(json!({"name": name, "retired": version})))
        }
        Ok(Ok(ControlOutcome::Rejected { reason })) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, reason))
        }
        Ok(Ok(other)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("unexpected control-plane answer {other:?}"),
        )),
        Ok(Err(e)) => Err(ApiError::retry_later(format!(
            "the control plane could not decide ({e}); retry"
        ))),
        Err(e) => Err(ApiError::retry_later(format!("node is shutting down: {e}"))),
    }
}
