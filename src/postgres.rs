//! Connections to PostgreSQL for the daemon's checks and for base backups, configured from
//! `PITR_PG_URL` or the standard libpq variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`,
//! `PGPASSWORD`).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::Settings;

/// A tokio-postgres config from `PITR_PG_URL`, or else from the standard libpq variables.
pub fn config(settings: &Settings) -> Result<tokio_postgres::Config> {
    if let Some(url) = &settings.pg_url {
        return url
            .parse()
            .context("PITR_PG_URL is not a valid Postgres connection string");
    }
    let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let mut config = tokio_postgres::Config::new();
    config.host(
        variable("PGHOST")
            .as_deref()
            .unwrap_or("/var/run/postgresql"),
    );
    config.port(
        variable("PGPORT")
            .and_then(|port| port.parse().ok())
            .unwrap_or(5432),
    );
    config.user(variable("PGUSER").as_deref().unwrap_or("postgres"));
    config.dbname(variable("PGDATABASE").as_deref().unwrap_or("postgres"));
    if let Some(password) = variable("PGPASSWORD") {
        config.password(password);
    }
    config.application_name("pitr daemon");
    Ok(config)
}

/// Connects, failing within `limit`; the connection is driven on a background task.
pub async fn connect(settings: &Settings, limit: Duration) -> Result<tokio_postgres::Client> {
    let config = config(settings)?;
    let connect = config.connect(tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(limit, connect)
        .await
        .with_context(|| format!("Postgres did not answer within {} s", limit.as_secs()))?
        .context("cannot connect to Postgres (check PGHOST, PGPORT, PGUSER or PITR_PG_URL)")?;
    tokio::spawn(connection);
    Ok(client)
}
