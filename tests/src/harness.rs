//! Run a real gateway in-process on 127.0.0.1 from a TOML config text.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use kleingate_gateway::{server, AppState, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Gateway {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Gateway {
    /// Start a gateway; the environment is ignored so tests cannot pick up a developer's settings.
    pub async fn start(config_toml: &str) -> Gateway {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        f.write_all(config_toml.as_bytes()).expect("write config");
        let cfg = Config::load_with_env(Some(f.path()), Some(Default::default())).expect("config");
        let state = AppState::from_config(cfg).expect("backends");
        Self::start_state(state).await
    }

    pub async fn start_state(state: Arc<AppState>) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, state.clone(), async move {
            let _ = rx.await;
        }));
        Gateway {
            addr,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Send the shutdown signal (graceful drain) and return the server task.
    pub fn begin_shutdown(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("server task")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
