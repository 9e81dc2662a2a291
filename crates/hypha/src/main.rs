//! `hypha`: the one binary. Parses the command line and hands over to the library crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "hypha",
    version,
    about = "Hypha service mesh: control plane and sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a directory (or file) of Istio YAML, like `istioctl analyze`.
    Check {
        /// Directory or file to check.
        path: PathBuf,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Run the control plane: watch a config directory and serve Envoy xDS over ADS.
    Control {
        /// Directory of Istio YAML (defaults to the embedded bookinfo example).
        #[arg(long, env = "HYPHA_CONFIG")]
        config: Option<PathBuf>,
        /// Address to serve xDS on; repeat for several (IPv4 and IPv6).
        #[arg(long, default_values_t = [SocketAddr::from(([127, 0, 0, 1], 15010))])]
        listen: Vec<SocketAddr>,
    },
    /// Start the mesh demo (for now: the control plane on the bookinfo example).
    Demo {
        /// Address to serve xDS on.
        #[arg(long, default_values_t = [SocketAddr::from(([127, 0, 0, 1], 15010))])]
        listen: Vec<SocketAddr>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { path, output } => check(&path, output),
        Command::Control { config, listen } => run(control(config, listen)),
        Command::Demo { listen } => run(control(None, listen)),
    }
}

fn check(path: &std::path::Path, output: Output) -> ExitCode {
    let loaded = hypha_config::load(path);
    let failed = loaded.has_errors();
    let diags = loaded.diagnostics.into_sorted();
    match output {
        Output::Json => {
            let doc = serde_json::json!({
                "path": path.display().to_string(),
                "resources": loaded.config.resource_count(),
                "errors": diags.iter().filter(|d| d.severity == hypha_config::Severity::Error).count(),
                "diagnostics": diags,
            });
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        Output::Human => {
            for d in &diags {
                println!("{d}");
            }
            let errors = diags
                .iter()
                .filter(|d| d.severity == hypha_config::Severity::Error)
                .count();
            if failed {
                println!("\n{errors} error(s) in {}", path.display());
            } else {
                println!(
                    "✔ {}: {} resources, no errors",
                    path.display(),
                    loaded.config.resource_count()
                );
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hypha: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hypha: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HYPHA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

async fn control(config: Option<PathBuf>, listen: Vec<SocketAddr>) -> anyhow::Result<()> {
    Ok(hypha_control::run(config, &listen).await?)
}
