//! The one place where error causes become HTTP statuses.
//!
//! Bad input → 400/404/405/412/413, a body that does not arrive in time → 408; a full state store → 507; no leader or no quorum → 503; a peer that failed after taking
//! the request → 502; a deadline → 504; our own bug → 500. An upstream failure is never a 400.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::Response;

use crate::peer::message::RemoteError;
use crate::raft::ReplicaError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// `allow`: the methods the path takes (the `Allow` header, RFC 9110 §15.5.6).
    #[error("method not allowed (allowed: {allow})")]
    MethodNotAllowed { allow: String },
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// Accepted as HTTP, but more than the log takes in one piece (events with metadata).
    #[error("{0}")]
    Oversized(String),
    /// A command's path and query are longer than `proxy::MAX_URI`.
    #[error("{0}")]
    UriTooLong(String),
    /// More request headers than a node passes to the app that runs a command
    /// (`proxy::headers`).
    #[error("request headers: {0}")]
    HeadersTooLarge(#[from] crate::proxy::headers::TooManyHeaders),
    /// A request's head larger than the node's whole budget for heads (`api::count_head`).
    #[error("{0}")]
    HeadTooLarge(String),
    /// The request conflicts with the current state (a subscription a node still declares).
    #[error("{0}")]
    Conflict(String),
    /// Well-formed, but not what this resource can take: an `Idempotency-Key` first used for a
    /// request with other parameters or body (the IETF idempotency-key draft's 422).
    #[error("{0}")]
    Unprocessable(String),
    #[error("revision mismatch")]
    PreconditionFailed { current: Option<u64> },
    /// A transaction's op `op` found `key` at `current`: 412 naming them; nothing written.
    #[error("operation {op} (key {key:?}): revision mismatch; nothing was written")]
    TxnFailed { op: u32, key: String, current: Option<u64> },
    #[error("{0}")]
    Unavailable(String),
    /// This node has no room for the request now (its body budget is spent): 503 with a
    /// `Retry-After`, as it frees within seconds.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    BadGateway(String),
    /// The state store is at its quota: 507 until something is deleted.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("deadline exceeded")]
    Timeout,
    /// A deadline passed, with what is known of the outcome (a membership change that may
    /// still be applied, a snapshot not made in time).
    #[error("deadline exceeded: {0}")]
    Deadline(String),
    /// The client did not send its whole request in time.
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
    /// No or the wrong credentials (401, with `WWW-Authenticate` naming `realm`: the secret
    /// store's token or the API token).
    #[error("{message}")]
    Unauthorized { realm: &'static str, message: String },
    /// Refused (403): the API is off on this node, or the credentials given do not allow this
    /// request (the read token's write).
    #[error("{0}")]
    Forbidden(String),
}

/// Marks an answer that says the request was refused before anything was done (`Busy`: a
/// budget or queue full), so it may be tried again anywhere: on an HTTP/2 connection whose
/// client takes no answers, the server says it with a stream reset instead (`api::serve`).
#[derive(Debug, Clone, Copy)]
pub struct Refused;

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } | ApiError::Oversized(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::PreconditionFailed { .. } | ApiError::TxnFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge(_) | ApiError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Timeout | ApiError::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The JSON answer, with `Retry-After` and the `Refused` mark on a `Busy` one.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut body = serde_json::json!({ "status": status.as_u16(), "message": self.to_string() });
        if let ApiError::PreconditionFailed { current } = &self {
            body["revision"] = serde_json::json!(current);
        }
        if let ApiError::TxnFailed { op, key, current } = &self {
            body["failed"] = serde_json::json!({ "operation": op, "key": key, "revision": current });
        }
        let mut resp = super::json_response(status, &body);
        if let ApiError::Busy(_) = &self {
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            resp.extensions_mut().insert(Refused);
        }
        if let ApiError::Unauthorized { realm, .. } = &self {
            // Realms are our own constants (`REALM_*`): always header text.
            if let Ok(value) = http::HeaderValue::from_str(&format!("Bearer realm=\"{realm}\"")) {
                resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, value);
            }
        }
        if let ApiError::MethodNotAllowed { allow } = &self {
            if let Ok(value) = http::HeaderValue::from_str(allow) {
                resp.headers_mut().insert(http::header::ALLOW, value);
            }
        }
        resp
    }
}

impl From<RemoteError> for ApiError {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::NotLeader { .. } | RemoteError::Unavailable(_) | RemoteError::NotServed(_) => {
                ApiError::Unavailable(e.to_string())
            }
            RemoteError::Invalid(m) => ApiError::BadRequest(m),
            RemoteError::Internal(m) => ApiError::BadGateway(m),
            RemoteError::Timeout(m) => ApiError::Deadline(m),
        }
    }
}

impl From<ReplicaError> for ApiError {
    fn from(e: ReplicaError) -> Self {
        match e {
            // A write delivered to a leader whose link then failed is a 503 too: from the
            // client's side that is issue 2's "no quorum within the deadline" (a leader paused
            // with another node leaves exactly this), and its message says the outcome is unknown.
            ReplicaError::Unavailable | ReplicaError::Undecided | ReplicaError::Stopped | ReplicaError::Forward { .. } => ApiError::Unavailable(e.to_string()),
            ReplicaError::Remote(r) => r.into(),
            ReplicaError::TooLarge { .. } => ApiError::Oversized(e.to_string()),
            ReplicaError::Raft(m) => ApiError::Internal(m),
        }
    }
}

impl From<crate::store::secret::SecretError> for ApiError {
    fn from(e: crate::store::secret::SecretError) -> Self {
        use crate::store::secret::SecretError;
        match e {
            SecretError::Off => ApiError::Forbidden(e.to_string()),
            SecretError::Unreadable { .. } => ApiError::Internal(e.to_string()),
            SecretError::Store(s) => s.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidName(_) | StoreError::InvalidJson(_) => ApiError::BadRequest(e.to_string()),
            StoreError::TooLarge { .. } => ApiError::Oversized(e.to_string()),
            StoreError::QuotaExceeded(m) => ApiError::InsufficientStorage(m),
            StoreError::PreconditionFailed { current } => ApiError::PreconditionFailed { current },
            StoreError::Replica(r) => r.into(),
            StoreError::Unexpected(_) => ApiError::Internal(e.to_string()),
            StoreError::NotEveryMember(m) => ApiError::Unavailable(m),
            StoreError::InvalidTxn(m) => ApiError::BadRequest(m),
            StoreError::Overflow(m) => ApiError::Conflict(m),
            StoreError::TxnFailed { op, key, current } => ApiError::TxnFailed { op, key, current },
        }
    }
}
