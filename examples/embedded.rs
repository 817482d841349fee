//! An application that embeds raftbridge: its own service, and the `raftbridge` command line
//! around it (`cli::main_with`). The README's "Writing a service in Rust" is this file.
//!
//! ```sh
//! cargo build --release --example embedded
//! target/release/examples/embedded dev      # three nodes on loopback, each running `users`
//! curl -s -X POST 127.0.0.1:8401/api/v1/users -d '{"email":"a@example.com"}'
//! ```
//!
//! `embedded node --id 1 --data-dir d1 ...` takes every flag of `raftbridge node`.

use raftbridge::sdk::subscription::SubscriptionBuilder;
use raftbridge::sdk::{CommandBuilder, Ctx, Emit, HandlerError, Service, ServiceParts};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct SignUp {
    email: String,
}

#[derive(Deserialize)]
struct NoParams {}

#[derive(Serialize)]
struct Created {
    id: String,
}

#[derive(Serialize, Deserialize)]
struct User {
    email: String,
}

#[derive(Serialize, Deserialize)]
struct SignedUp {
    id: String,
}

async fn sign_up(ctx: Ctx, input: SignUp, _: NoParams) -> Result<Created, HandlerError> {
    if !input.email.contains('@') {
        return Err(HandlerError::bad_request("not an email address")); // 400 {"status","message"}
    }
    // From the input, not a random id: a run again under the same Idempotency-Key (its node
    // died mid-request) writes the same key, and its tagged write and emit apply once.
    let id = input.email.to_ascii_lowercase();
    ctx.state().put("users", &id, &User { email: input.email }).await?; // any Serialize, stored as JSON
    ctx.emit("userSignedUp", &SignedUp { id: id.clone() }).await?; // returns once fsynced on a quorum
    Ok(Created { id }) // 200 {"id":..}
}

fn users() -> ServiceParts {
    Service::new("users", 1)
        .command(CommandBuilder::post("signUp", "users").handler(sign_up)) // POST /api/v1/users
        .subscription(
            SubscriptionBuilder::new("welcomeMail") // shared, durable, manual ack
                .event_name("userSignedUp")
                .handler(|ctx: Ctx, event| async move {
                    let signed_up: SignedUp = event.payload_as()?; // not a SignedUp: a 500, a nack
                    let user: Option<User> = ctx.state().get_as("users", &signed_up.id).await?;
                    let Some(user) = user else { return Ok(None) }; // Ok = ack, Err = nack
                    // Ok(Some(..)) emits an event once this one is acked.
                    Ok(Some(Emit::new("welcomeMailQueued", &serde_json::json!({ "to": user.email }))?))
                }),
        )
        .into_parts()
        // Declarations are checked when the service is built: a bad route fails here, at start.
        .expect("the users service's declarations are valid")
}

fn main() -> std::process::ExitCode {
    raftbridge::cli::main_with(vec![users()])
}
