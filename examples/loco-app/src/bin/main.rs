//! `cargo run -p loco-outbox-example -- start` (or `task outbox:status`, …).

use loco_outbox_example::app::App;
use loco_outbox_example::migration::Migrator;

#[tokio::main]
async fn main() -> loco_rs::Result<()> {
    loco_rs::cli::main::<App, Migrator>().await
}
