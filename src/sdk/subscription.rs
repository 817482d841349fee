//! Typed builder for subscriptions: a filter, delivery options and an async handler.
//!
//! Defaults follow PURISTA: shared (competing consumers), durable, manual ack (the handler's
//! `Ok` is the ack, `Err` the nack), 5 attempts, then the dead letters.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use super::BoxFuture;
use super::Ctx;
use super::Emit;
use super::HandlerError;
use super::SubscriptionHandler;
use crate::broker::event::Event;
use crate::broker::event::EventFilter;
use crate::broker::event::SubscriptionDecl;

pub struct SubscriptionBuilder {
    decl: SubscriptionDecl,
}

impl SubscriptionBuilder {
    pub fn new(name: impl Into<String>) -> SubscriptionBuilder {
        SubscriptionBuilder { decl: SubscriptionDecl::new(name, EventFilter::default()) }
    }
    pub fn event_name(mut self, v: impl Into<String>) -> Self {
        self.decl.filter.event_name = Some(v.into());
        self
    }
    pub fn sender_service(mut self, v: impl Into<String>) -> Self {
        self.decl.filter.sender_service = Some(v.into());
        self
    }
    pub fn sender_version(mut self, v: impl Into<String>) -> Self {
        self.decl.filter.sender_version = Some(v.into());
        self
    }
    pub fn sender_target(mut self, v: impl Into<String>) -> Self {
        self.decl.filter.sender_target = Some(v.into());
        self
    }
    pub fn message_type(mut self, v: impl Into<String>) -> Self {
        self.decl.filter.message_type = Some(v.into());
        self
    }
    pub fn principal_id(mut self, v: impl Into<String>) -> Self {
        self.decl.filter.principal_id = Some(v.into());
        self
    }
    pub fn tenant_id(mut self, v: impl Into<String>) -> Self {
        self.decl.filter.tenant_id = Some(v.into());
        self
    }
    /// Each event to one instance (true, the default) or to every instance.
    pub fn shared(mut self, yes: bool) -> Self {
        self.decl.shared = yes;
        self
    }
    /// Keep the position while no consumer runs (true, the default).
    pub fn durable(mut self, yes: bool) -> Self {
        self.decl.durable = yes;
        self
    }
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.decl.max_attempts = n;
        self
    }
    pub fn ack_deadline(mut self, d: Duration) -> Self {
        // Saturated, not truncated: a huge deadline must fail the build's bound, not wrap. Not
        // raised to 1 ms either: a zero (or sub-millisecond) deadline fails the build, as the
        // sidecar's `ack_deadline_ms = 0` does, rather than dead-letter every event.
        self.decl.ack_deadline_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self
    }
    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.decl.max_in_flight = n;
        self
    }

    pub fn handler<F, Fut>(self, f: F) -> (SubscriptionDecl, Arc<dyn SubscriptionHandler>)
    where
        F: Fn(Ctx, Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<Emit>, HandlerError>> + Send + 'static,
    {
        (self.decl, Arc::new(Typed(f)))
    }
}

struct Typed<F>(F);

impl<F, Fut> SubscriptionHandler for Typed<F>
where
    F: Fn(Ctx, Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Emit>, HandlerError>> + Send + 'static,
{
    fn handle(&self, ctx: Ctx, event: Event) -> BoxFuture<Result<Option<Emit>, HandlerError>> {
        guarded(|| (self.0)(ctx, event))
    }
}

/// Runs a handler so that its panic is a nack, not a dead node (an every-instance loop that
/// panicked ended the node, which replayed the event at restart and ended again): also a
/// handler that panics before it returns its future (a payload parsed with `unwrap` outside
/// the `async` block).
fn guarded<Fut>(start: impl FnOnce() -> Fut) -> BoxFuture<Result<Option<Emit>, HandlerError>>
where
    Fut: Future<Output = Result<Option<Emit>, HandlerError>> + Send + 'static,
{
    let panicked = || HandlerError::unhandled("subscription handler panicked");
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)) {
        Ok(fut) => {
            let fut = std::panic::AssertUnwindSafe(fut).catch_unwind();
            Box::pin(async move { fut.await.unwrap_or_else(|_| Err(panicked())) })
        }
        Err(_) => Box::pin(std::future::ready(Err(panicked()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_handler_that_panics_before_or_inside_its_future_is_a_nack() {
        let before = guarded(|| -> std::future::Ready<Result<Option<Emit>, HandlerError>> { panic!("before the future") });
        assert_eq!(before.await.expect_err("a nack").status, 500);
        let inside = guarded(|| async { panic!("inside the future") });
        assert_eq!(inside.await.expect_err("a nack").status, 500);
        let fine = guarded(|| async { Ok(None) });
        assert!(fine.await.expect("ran").is_none());
    }
}
