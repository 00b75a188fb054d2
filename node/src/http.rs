//! The HTTP API of a node: JSON under `/v1`, Prometheus text at `/metrics`, a status
//! page at `/`. Every error is JSON `{"error": ...}` with a fitting status code.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::body::{BoxBody, EitherBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse, ResponseError};
use kiln_actors::control::state::ControlCommand;
use kiln_actors::control::types::node_id_of;
use kiln_actors::control::{ControlPlane, GetStripes, Propose};
use kiln_actors::membership::{
    ForgetMember, GetNodeInfo, ListMembers, MemberView, MembershipActor,
};
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct ApiState {
    pub membership: Addr<MembershipActor>,
    pub control: Addr<ControlPlane>,
    pub kv: Option<Arc<crate::kv_api::KvRouter>>,
    pub broadcast: Option<crate::broadcast_api::BroadcastApi>,
    pub artifacts: Option<crate::artifact_api::ArtifactApi>,
    pub registry: Arc<Registry>,
    pub token: Option<String>,
    /// What the node's storage cannot do now (see `GET /v1/node`).
    pub health: kiln_actors::health::StorageHealth,
    /// Room for the request bodies this node holds at once.
    pub bodies: BodyBudget,
}

/// Bytes of request bodies (key/value values, broadcast publishes) that all
/// clients together may have a node hold at once. Each body has its own bound
/// (`max_value_bytes`, the publish limit); this one bounds their sum, so that
/// many large requests at once cannot take the node's memory.
pub const BODY_BUDGET_BYTES: usize = 512 << 20;

/// How long a body waits for room in the budget before its request gets `503`.
const BODY_ROOM_WAIT: Duration = Duration::from_secs(5);

/// The node's budget for request bodies held in memory, counted in KiB.
#[derive(Clone)]
pub struct BodyBudget {
    room: Arc<Semaphore>,
    bytes: usize,
    wait: Duration,
}

/// The room one request's body holds in the [`BodyBudget`]; given back on drop.
#[derive(Default)]
pub struct BodyRoom {
    permit: Option<OwnedSemaphorePermit>,
    /// Bytes this room was taken for (its permits are these in KiB, rounded up).
    bytes: usize,
}

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self::waiting(bytes, BODY_ROOM_WAIT)
    }

    fn waiting(bytes: usize, wait: Duration) -> Self {
        BodyBudget {
            room: Arc::new(Semaphore::new(bytes.div_ceil(1024))),
            bytes,
            wait,
        }
    }

    /// Makes `held` room for `len` more bytes, waiting up to
    /// [`BODY_ROOM_WAIT`] for other requests to give theirs back. Counted in
    /// bytes: a body sent in many small chunks takes no more than its size.
    pub async fn take(&self, len: usize, held: &mut BodyRoom) -> Result<(), ApiError> {
        let bytes = held.bytes.saturating_add(len);
        let held_kib = held.permit.as_ref().map_or(0, |p| p.num_permits());
        let kib = bytes.div_ceil(1024).saturating_sub(held_kib);
        held.bytes = bytes;
        if kib == 0 {
            return Ok(());
        }
        let kib = u32::try_from(kib).unwrap_or(u32::MAX);
        let acquire = self.room.clone().acquire_many_owned(kib);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => {
                match held.permit.as_mut() {
                    Some(p) => p.merge(permit),
                    None => held.permit = Some(permit),
                }
                Ok(())
            }
            _ => Err(ApiError::retry_later(format!(
                "this node holds {} MiB of request bodies from other clients and has no room \
                 for this one now; send it again shortly, or spread large requests over more \
                 nodes",
                self.bytes >> 20
            ))),
        }
    }
}

/// An API error: status code and a message for the client.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, msg: String) -> Self {
        ApiError(status, msg)
    }

    #[cfg(test)]
    pub fn status(&self) -> StatusCode {
        self.0
    }

    /// `503` with `Retry-After`: the cluster is between actives or not ready.
    pub fn retry_later(msg: String) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, msg)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.0
    }
    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.0);
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            resp.insert_header((header::RETRY_AFTER, "1"));
        }
        resp.json(json!({ "error": self.1 }))
    }
}

fn unavailable<E: std::fmt::Display>(e: E) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("node is shutting down or overloaded: {e}"),
    )
}

#[derive(Serialize)]
pub struct MemberJson {
    pub id: String,
    pub name: String,
    pub addrs: Vec<String>,
    pub state: &'static str,
    pub incarnation: u64,
    pub last_seen_ms: Option<u64>,
    /// This node holds a direct connection to the member.
    pub connected: bool,
}

fn member_json(v: MemberView) -> MemberJson {
    MemberJson {
        id: v.record.id,
        name: v.record.name,
        addrs: v.record.addrs,
        state: v.record.status.as_str(),
        incarnation: v.record.incarnation,
        last_seen_ms: v.last_seen_unix_ms,
        connected: v.connected,
    }
}

async fn node(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let info = state
        .membership
        .send(GetNodeInfo)
        .await
        .map_err(unavailable)?;
    // Parts of the node that cannot write their files now, and why.
    let storage_errors: serde_json::Map<String, serde_json::Value> = state
        .health
        .failures()
        .into_iter()
        .map(|(part, e)| (part.as_str().to_string(), serde_json::Value::String(e)))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "id": info.id,
        "name": info.name,
        "addrs": info.addrs,
        "cluster": info.cluster,
        "incarnation": info.incarnation,
        "version": env!("CARGO_PKG_VERSION"),
        "storage_errors": storage_errors,
    })))
}

async fn members(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let rows = state
        .membership
        .send(ListMembers)
        .await
        .map_err(unavailable)?;
    let me = rows.iter().find(|r| r.is_self).map(|r| r.record.id.clone());
    let members: Vec<MemberJson> = rows.into_iter().map(member_json).collect();
    Ok(HttpResponse::Ok().json(json!({ "self": me, "members": members })))
}

#[derive(Debug, serde::Deserialize)]
struct ForgetQuery {
    #[serde(default)]
    force: bool,
}

/// The stripes whose data only `id` holds (it is their active or in-sync
/// standby, and no other member is either): forgetting it drops that data.
fn held_only_by(view: &kiln_actors::control::ClusterStripes, id: &str) -> Vec<u32> {
    let holds = |role: &str| role == "active" || role == "standby";
    view.stripes
        .iter()
        .filter(|s| {
            s.members.iter().any(|m| m.id == id && holds(m.role))
                && !s.members.iter().any(|m| m.id != id && holds(m.role))
        })
        .map(|s| s.id)
        .collect()
}

async fn forget(
    state: web::Data<ApiState>,
    id: web::Path<String>,
    query: web::Query<ForgetQuery>,
) -> Result<HttpResponse, ApiError> {
    use kiln_actors::membership::state::ForgetError;
    let id = id.into_inner();
    let view = state.control.send(GetStripes).await.map_err(unavailable)?;
    if !query.force {
        let only = held_only_by(&view, &id);
        if !only.is_empty() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "{id} is the only member holding the data of stripe(s) {only:?} (no in-sync \
                     standby): forgetting it drops that data. If it is only cut off or stopped, \
                     bring it back instead; if it is gone for good, forget it with --force \
                     (?force=true)"
                ),
            ));
        }
    }
    let placed = view
        .stripes
        .iter()
        .any(|s| s.members.iter().any(|m| m.id == id))
        || view.witnesses.contains(&id);
    match state
        .membership
        .send(ForgetMember(id.clone()))
        .await
        .map_err(unavailable)?
    {
        Ok(()) => {}
        // Forgotten before, but its place in the control plane could not be
        // taken then (no majority): this forget takes it.
        Err(ForgetError::Unknown(_)) if placed => {}
        Err(e @ ForgetError::Unknown(_)) => {
            return Err(ApiError(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(e) => return Err(ApiError(StatusCode::CONFLICT, e.to_string())),
    }
    // The forgotten node also loses its place in its stripe (or as a witness);
    // proposed whatever this node's view says (it may lag the node's join).
    let removed = state
        .control
        .send(Propose(ControlCommand::Remove {
            node: node_id_of(&id),
        }))
        .await
        .map_err(unavailable)?;
    match removed {
        Ok(_) => Ok(HttpResponse::Ok().json(json!({ "forgotten": id }))),
        Err(e) => {
            tracing::warn!(peer = %id, error = %e, "forgotten member keeps its place in the control plane for now");
            Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{id} is forgotten by the members, but its place in the control plane could \
                     not be taken ({e}); run the same forget again once the control plane has a \
                     majority"
                ),
            ))
        }
    }
}

async fn stripes(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let mut view = state.control.send(GetStripes).await.map_err(unavailable)?;
    // Each stripe's active knows how far behind its members are: asked all at
    // once, briefly (a stripe without an answer shows no lag).
    if let Some(kv) = state.kv.as_ref() {
        let asks = view
            .stripes
            .iter()
            .map(|s| kv.member_lags(s.id, std::time::Duration::from_secs(1)));
        let answers = futures::future::join_all(asks).await;
        for (st, lags) in view.stripes.iter_mut().zip(answers) {
            let Some(lags) = lags else { continue };
            for m in st.members.iter_mut() {
                m.lag = if m.role == "active" {
                    Some(0)
                } else {
                    lags.get(&m.id).copied()
                };
            }
        }
    }
    Ok(HttpResponse::Ok().json(view))
}

async fn metrics(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &state.registry).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}"),
        )
    })?;
    Ok(HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(out))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn status_page(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let info = state
        .membership
        .send(GetNodeInfo)
        .await
        .map_err(unavailable)?;
    let rows = state
        .membership
        .send(ListMembers)
        .await
        .map_err(unavailable)?;
    let mut html = format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2>\
         <title>kiln {name}</title><style>body{{font-family:sans-serif;margin:2em}}\
         td,th{{padding:.2em .8em;text-align:left}}.alive{{color:#080}}.suspect{{color:#a60}}\
         .dead{{color:#b00}}.left{{color:#777}}</style></head><body>\
         <h1>kiln node {name}</h1><p>id <code>{id}</code><br>cluster <code>{cluster}</code></p>\
         <h2>Members</h2><table><tr><th>name</th><th>id</th><th>address</th><th>state</th>\
         <th>incarnation</th></tr>",
        name = escape(&info.name),
        id = escape(&info.id),
        cluster = escape(info.cluster.as_deref().unwrap_or("(joining)")),
    );
    for r in rows {
        let s = r.record.status.as_str();
        html.push_str(&format!(
            "<tr><td>{}{}</td><td><code>{}</code></td><td>{}</td><td class={s}>{s}</td><td>{}</td></tr>",
            escape(&r.record.name),
            if r.is_self { " (this node)" } else { "" },
            escape(&r.record.id),
            escape(r.record.addrs.first().map(String::as_str).unwrap_or("")),
            r.record.incarnation
        ));
    }
    html.push_str("</table>");
    let view = state.control.send(GetStripes).await.map_err(unavailable)?;
    html.push_str(&format!(
        "<h2>Stripes</h2><p>this node: {}<br>control-plane leader <code>{}</code>, voters {}</p>",
        escape(&view.placement),
        escape(view.leader.as_deref().unwrap_or("(none known)")),
        view.voters.len()
    ));
    for w in &view.warnings {
        html.push_str(&format!("<p class=suspect>{}</p>", escape(w)));
    }
    html.push_str(
        "<table><tr><th>stripe</th><th>epoch</th><th>slots</th><th>member</th><th>role</th></tr>",
    );
    for st in &view.stripes {
        for m in &st.members {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                st.id,
                st.epoch,
                st.slots,
                escape(&m.id),
                m.role
            ));
        }
    }
    html.push_str("</table><p><a href=/metrics>metrics</a></p></body></html>");
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(html))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()))
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is
/// case-insensitive, RFC 9110 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim_start())
}

/// Compares tokens in time that does not depend on where they differ.
fn same_token(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Bearer-token check for everything but `/metrics`.
async fn require_token(
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<EitherBody<BoxBody>>, actix_web::Error> {
    let expected = req
        .app_data::<web::Data<ApiState>>()
        .and_then(|s| s.token.clone());
    if let Some(token) = expected {
        if req.path() != "/metrics" {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_token);
            if !given.is_some_and(|g| same_token(g, &token)) {
                let resp = HttpResponse::Unauthorized()
                    .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                    .json(json!({ "error": "missing or wrong bearer token; send Authorization: Bearer <http_token>" }));
                return Ok(req.into_response(resp).map_into_right_body());
            }
        }
    }
    next.call(req).await.map(|r| r.map_into_left_body())
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    // The key/value API first, under a static prefix, and dispatched by hand:
    // actix matches each `{segment}` pattern with a regex, tried in
    // registration order, which cost ~1.5 % of a node's CPU under write load.
    cfg.service(web::scope("/v1/kv").default_service(web::to(kv_dispatch)))
        .service(resource("/", "GET").get(status_page))
        .service(resource("/metrics", "GET").get(metrics))
        .service(resource("/v1/node", "GET").get(node))
        .service(resource("/v1/cluster/members", "GET").get(members))
        .service(resource("/v1/cluster/members/{id}", "DELETE").delete(forget))
        .service(resource("/v1/cluster/stripes", "GET").get(stripes))
        .service(
            resource("/v1/cluster/stripes/{stripe}/handover", "POST").post(crate::kv_api::handover),
        )
        .service(resource("/v1/broadcast", "POST").post(crate::broadcast_api::publish))
        .service(resource("/v1/broadcast/stream", "GET").get(crate::broadcast_api::stream))
        .service(resource("/v1/broadcast/origins", "GET").get(crate::broadcast_api::origins))
        .service(resource("/v1/artifacts", "GET").get(crate::artifact_api::list))
        .service(
            resource("/v1/artifacts/{name}", "GET, PUT, DELETE")
                .get(crate::artifact_api::get)
                .put(crate::artifact_api::put)
                .delete(crate::artifact_api::delete),
        )
        .default_service(web::to(not_found));
}

/// An endpoint that answers a method it does not have `405` with the ones it
/// has (`allow`), rather than the `404` of a path that does not exist.
fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move |req: actix_web::HttpRequest| {
        std::future::ready(method_not_allowed(&req, allow))
    }))
}

fn method_not_allowed(req: &actix_web::HttpRequest, allow: &str) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header((header::ALLOW, allow))
        .json(json!({
            "error": format!("{} is not allowed here; allowed: {allow}", req.method())
        }))
}

/// Every request under `/v1/kv`: `/v1/kv/{map}` (GET lists) and
/// `/v1/kv/{map}/{key}` (GET, PUT, DELETE).
async fn kv_dispatch(
    state: web::Data<ApiState>,
    req: actix_web::HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let Some(rest) = req.path().strip_prefix("/v1/kv/") else {
        return not_found().await;
    };
    let shape = kv_path_shape(rest);
    match (shape, req.method()) {
        (Some(2), &Method::PUT) => crate::kv_api::put(state, req, payload).await,
        (Some(2), &Method::GET) => crate::kv_api::get(state, query_of(&req)?, req).await,
        (Some(2), &Method::DELETE) => crate::kv_api::delete(state, req).await,
        (Some(1), &Method::GET) => crate::kv_api::list(state, query_of(&req)?, req).await,
        _ => bad_kv_path(&req, shape),
    }
}

/// A request's query string as `T`, as the `web::Query` extractor (and its
/// error handler in [`app`]) would give it.
fn query_of<T: serde::de::DeserializeOwned>(
    req: &actix_web::HttpRequest,
) -> Result<web::Query<T>, ApiError> {
    web::Query::from_query(req.query_string())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// How many segments a path under `/v1/kv/` has (1 or 2), or `None` when it
/// has another shape (an empty map or key, a key with an unencoded '/').
fn kv_path_shape(rest: &str) -> Option<usize> {
    let segments = rest.split('/');
    let mut n = 0;
    for s in segments {
        if s.is_empty() || n == 2 {
            return None;
        }
        n += 1;
    }
    Some(n)
}

/// A request under `/v1/kv/` of no known shape, or with a method its path
/// does not have.
fn bad_kv_path(
    req: &actix_web::HttpRequest,
    shape: Option<usize>,
) -> Result<HttpResponse, ApiError> {
    if let Some(segments) = shape {
        let allowed = if segments == 1 {
            "GET"
        } else {
            "GET, PUT, DELETE"
        };
        return Ok(method_not_allowed(req, allowed));
    }
    Err(ApiError(
        StatusCode::BAD_REQUEST,
        "a key/value path is /v1/kv/{map}/{key} (a '/' inside a map or key is sent as %2F), \
         or /v1/kv/{map} to list; neither may be empty"
            .into(),
    ))
}

pub fn app(
    state: web::Data<ApiState>,
) -> actix_web::App<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<EitherBody<BoxBody>>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    actix_web::App::new()
        .app_data(state)
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| ApiError(StatusCode::BAD_REQUEST, e.to_string()).into()),
        )
        .app_data(web::QueryConfig::default().error_handler(|e, req| {
            // The parser names no parameter: the query shows which.
            let why = match &e {
                actix_web::error::QueryPayloadError::Deserialize(d) => d.to_string(),
                other => other.to_string(),
            };
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("cannot read the query `{}`: {why}", req.query_string()),
            )
            .into()
        }))
        .wrap(actix_web::middleware::from_fn(require_token))
        .configure(configure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_with_any_case_of_scheme() {
        assert_eq!(bearer_token("Bearer tok"), Some("tok"));
        assert_eq!(bearer_token("bearer tok"), Some("tok"));
        assert_eq!(bearer_token("BEARER  tok "), Some("tok"));
        assert_eq!(bearer_token("Basic dXNlcg=="), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert!(same_token("tok", "tok"));
        assert!(!same_token("tok", "tak") && !same_token("to", "tok"));
    }

    #[tokio::test]
    async fn bodies_wait_for_room_and_give_it_back() {
        let budget = BodyBudget::waiting(8 << 10, Duration::from_millis(50));
        let mut first = BodyRoom::default();
        budget.take(3 << 10, &mut first).await.unwrap();
        budget.take(4 << 10, &mut first).await.unwrap();
        // 7 KiB held of 8: a 2 KiB body finds no room and is told to retry.
        let mut second = BodyRoom::default();
        let refused = budget.take(2 << 10, &mut second).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        // One waiting while the first is dropped gets its room.
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut third = BodyRoom::default();
                budget.take(5 << 10, &mut third).await.map(|_| ())
            })
        };
        drop(first);
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(budget.room.available_permits(), 8);
    }

    #[tokio::test]
    async fn a_body_in_small_chunks_takes_room_for_its_size() {
        let budget = BodyBudget::waiting(8 << 10, Duration::from_millis(50));
        let mut trickle = BodyRoom::default();
        for _ in 0..4096 {
            budget.take(1, &mut trickle).await.unwrap();
        }
        // 4 KiB in one-byte chunks holds 4 KiB of room, not 4096.
        assert_eq!(budget.room.available_permits(), 4);
        budget.take(1, &mut trickle).await.unwrap();
        assert_eq!(budget.room.available_permits(), 3);
    }
}
