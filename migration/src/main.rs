//! The migration binary that `sea-orm-cli migrate -d migration …` runs.
//!
//! It applies the standalone [`seaorm_outbox_migration::Migrator`], whose bookkeeping lives in
//! its own table, so it can run against a database that already has a host app's migrations.

#[cfg(feature = "cli")]
#[tokio::main]
async fn main() {
    sea_orm_migration::cli::run_cli(seaorm_outbox_migration::Migrator).await;
}

#[cfg(not(feature = "cli"))]
fn main() {
    eprintln!("seaorm-outbox-migration was built without its `cli` feature");
    std::process::exit(2);
}
