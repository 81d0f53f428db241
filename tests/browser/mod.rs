//! The browser harness itself: a headless Chromium fills and submits a form served from loopback, and what
//! the server received, the cookie it set and a screenshot are checked. Skipped (with a message) where
//! chromium is not installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::support::browser::{temp_dir, Browser};

const FORM: &str = r#"<!doctype html>
<html><head><title>walhook form</title></head><body>
<form method="post" action="/submit">
  <label>Name <input name="name" id="name"></label>
  <label>Note <textarea name="note" id="note"></textarea></label>
  <button type="submit" id="send">Send</button>
</form>
</body></html>"#;

/// A loopback server: `GET /` is the form, `POST /submit` records the form body and sets a cookie.
async fn form_server(bodies: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let bodies = Arc::clone(&bodies);
            let service = service_fn(move |request: Request<Incoming>| {
                let bodies = Arc::clone(&bodies);
                async move {
                    let (parts, body) = request.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let page = if parts.method == http::Method::POST {
                        bodies
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&body).into_owned());
                        "<!doctype html><title>sent</title><p id=done>thank you</p>".to_string()
                    } else {
                        FORM.to_string()
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/html; charset=utf-8")
                            .header("set-cookie", "seen=yes; Path=/; HttpOnly; SameSite=Strict")
                            .body(Full::new(Bytes::from(page)))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    addr
}

/// `application/x-www-form-urlencoded` into pairs.
fn form_fields(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_fills_and_submits_a_form() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let addr = form_server(Arc::clone(&bodies)).await;

    browser.goto(&format!("http://{addr}/")).await;
    assert_eq!(browser.title().await, "walhook form");
    browser.type_into("#name", "Ada Lovelace").await;
    browser.type_into("#note", "1 + 1 = 2 & more").await;
    assert_eq!(
        browser.find("#name").await.property("value").await,
        "Ada Lovelace"
    );
    browser.click("#send").await;
    assert_eq!(browser.wait_for_text("#done", "thank").await, "thank you");
    browser.wait_for_url("/submit").await;

    let received = bodies.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(
        form_fields(&received[0]),
        [
            ("name".to_string(), "Ada Lovelace".to_string()),
            ("note".to_string(), "1 + 1 = 2 & more".to_string())
        ]
    );
    let seen = browser.cookie("seen").await.expect("the server's cookie");
    assert_eq!(seen.value, "yes");
    assert!(seen.http_only);
    assert_eq!(seen.same_site.as_deref(), Some("Strict"));
    // HttpOnly: the page's script cannot read it
    assert_eq!(browser.execute("return document.cookie", vec![]).await, "");
    assert_eq!(
        browser
            .execute("return arguments[0] * 2", vec![21.into()])
            .await,
        42
    );
    assert!(!browser.exists("#name").await);
    browser.back().await;
    browser.wait_for("#name").await;
    browser.refresh().await;
    assert_eq!(browser.find_all("label").await.len(), 2);

    browser.set_window_size(800, 600).await;
    let dir = temp_dir("screenshots");
    let path = dir.join("submitted.png");
    browser.screenshot(&path).await;
    let png = std::fs::read(&path).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
    // IHDR: width and height, big-endian, right after the signature and the chunk header
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width > 0 && width <= 800 && height > 0, "{width}x{height}");
    std::fs::remove_dir_all(dir).unwrap();
}
