//! A stand-alone fake Verda upstream for manual experiments and load scripts:
//! `fake-verda --listen 127.0.0.1:9000 --image-bytes 100000 [--mode image|json|503|500|hang|slow-ms=N]`.

use clap::Parser;
use kleingate_tests::fake_verda::{fake_jpeg, FakeVerda, Mode};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    #[arg(long, default_value_t = 100_000)]
    image_bytes: usize,
    #[arg(long, default_value = "image")]
    mode: String,
    /// Require this bearer token.
    #[arg(long)]
    token: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mode = match a.mode.as_str() {
        "image" => Mode::Image,
        "json" => Mode::Json,
        "503" => Mode::Unavailable { retry_after: None },
        "500" => Mode::ServerError,
        "hang" => Mode::Hang,
        s if s.starts_with("slow-ms=") => {
            Mode::Slow(std::time::Duration::from_millis(s[8..].parse()?))
        }
        other => anyhow::bail!("unknown mode {other}"),
    };
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    let fake = FakeVerda::serve_on(listener, fake_jpeg(a.image_bytes), a.token.as_deref());
    fake.set_mode(mode);
    eprintln!("fake verda on {}", fake.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
