//! A tiny JSON-over-HTTP/1.1 server on hyper, shared by the callback double and the `hold` control
//! port: every request is read whole (bounded), handed to one async function, and answered with JSON.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Request bodies above this are refused: callbacks and control requests are small.
const MAX_BODY: usize = 1 << 20;

/// Serves until the task is dropped. `handler(method, path_and_query, body)` returns a status and a
/// JSON body.
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(hyper::Method, String, Bytes) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (u16, String)> + Send + 'static,
{
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or similar: back off rather than spin.
                eprintln!("sse-load: accept on {:?}: {e}", listener.local_addr());
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handler = handler.clone();
                async move {
                    let method = req.method().clone();
                    let target = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str().to_owned())
                        .unwrap_or_default();
                    let (status, body) =
                        match Limited::new(req.into_body(), MAX_BODY).collect().await {
                            Ok(b) => handler(method, target, b.to_bytes()).await,
                            Err(_) => (
                                413,
                                r#"{"error":"body too large or unreadable"}"#.to_owned(),
                            ),
                        };
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response parts are valid");
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .await;
        });
    }
}
