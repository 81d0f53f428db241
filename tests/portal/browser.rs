//! The portal in a real headless Chromium, as a customer uses it: a link minted with `walhook.portal_link`
//! opens acme's pages; the customer adds an endpoint (a loopback receiver), reveals its secret, sends a test
//! event that the running daemon delivers signed, sees the delivery and its attempts, and resends one that
//! failed once the receiver works again. A used and an expired link show the refusal page; acme's session
//! gets the not-found page for globex's endpoint and delivery. The operator's overview closes the tour.
//!
//! With `PORTAL_SCREENSHOTS=1` the test also saves the main pages at 1200x800 as `docs/img/portal-*.png`,
//! which the README shows; without it nothing in the repository is written. (Not `WALHOOK_SCREENSHOTS`: every
//! `WALHOOK_*` variable is configuration, and an unknown key fails the test's config, as it should.) Skipped (with a message) where
//! chromium is not installed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use walhook::receiver::{Receiver, Reply};

use super::http::{dead_delivery, link, portal_config, roles, tenant_endpoint, Web};
use crate::support::browser::Browser;
use crate::support::*;

/// Saves the viewport as `docs/img/portal-<name>.png` when `PORTAL_SCREENSHOTS=1`.
async fn screenshot(browser: &Browser, name: &str) {
    if std::env::var("PORTAL_SCREENSHOTS").as_deref() != Ok("1") {
        return;
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("docs/img")
        .join(format!("portal-{name}.png"));
    browser.screenshot(&path).await;
    eprintln!("saved {}", path.display());
}

/// Sizes the window so that the page's viewport (what a screenshot shows) is `width` x `height`.
async fn viewport(browser: &Browser, width: u32, height: u32) {
    browser.set_window_size(width, height).await;
    let inner = browser
        .execute("return [window.innerWidth, window.innerHeight]", vec![])
        .await;
    let size = |i: usize, want: u32| (2 * want as i64 - inner[i].as_i64().unwrap()) as u32;
    browser
        .set_window_size(size(0, width), size(1, height))
        .await;
    let inner = browser
        .execute("return [window.innerWidth, window.innerHeight]", vec![])
        .await;
    assert_eq!(inner, serde_json::json!([width, height]));
}

/// Reloads the delivery's page until its status is `status`.
async fn wait_for_status(browser: &Browser, status: &str) {
    browser
        .wait_until(&format!("the delivery shows {status:?}"), || async {
            browser.wait_for(".facts .tag").await;
            let shown = browser
                .execute(
                    "return document.querySelector('.facts .tag').textContent",
                    vec![],
                )
                .await;
            if shown == status {
                return true;
            }
            browser.refresh().await;
            false
        })
        .await;
}

/// The status codes in the delivery page's attempts table, in its order.
async fn status_codes(browser: &Browser) -> Vec<String> {
    let mut codes = Vec::new();
    for cell in browser.find_all("table tbody tr td:nth-child(3)").await {
        codes.push(cell.text().await);
    }
    codes
}

/// The title of the message page (refusals, not found).
async fn message_title(browser: &Browser) -> String {
    browser.wait_for("section.message h1").await.text().await
}

/// The id at the end of the current URL, after `prefix` (e.g. "/deliveries/").
async fn id_in_url(browser: &Browser, prefix: &str) -> i64 {
    let url = browser.wait_for_url(prefix).await;
    let after = &url[url.rfind(prefix).unwrap() + prefix.len()..];
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("an id in {url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_manages_webhooks_in_a_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    let rx = Receiver::start().await.unwrap();
    let failing = Arc::new(AtomicBool::new(false));
    let flag = failing.clone();
    rx.set_responder(move |_, _| match flag.load(Ordering::SeqCst) {
        true => Reply::StatusWithBody(500, "not yet".into()),
        false => Reply::Status(200),
    });
    // acme's past: an endpoint with a dead delivery, so the picker offers its event type; globex's rows,
    // which acme's session must never reach
    let old = tenant_endpoint(&superuser, "acme", "https://hooks.acme.example/old").await;
    dead_delivery(&superuser, "acme", old).await;
    let globex = tenant_endpoint(&superuser, "globex", "https://hooks.globex.example/g").await;
    let globex_delivery = dead_delivery(&superuser, "globex", globex).await;
    // docs/catalog.md's catalog: order.created in two versions, which the form offers to pin
    let blocks = crate::catalog::doc_blocks();
    superuser.batch_execute(&blocks[0]).await.unwrap();
    superuser.batch_execute(&blocks[1]).await.unwrap();
    // loopback receivers pass the portal's network guard in this test only
    let web = Web::start(&portal_config(&pg, true)).await;
    let daemon = Daemon::start(pg.config());
    let root = format!("http://{}", web.addr);

    // the link, minted as the README's Portal section does, opens a session and lands on the endpoints,
    // without the token in the URL
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mint = "SELECT path FROM walhook.portal_link('acme', interval '1 hour')";
    assert!(
        readme.contains(&format!("(`{mint}`")),
        "the README mints so"
    );
    let first_link: String = superuser.query_one(mint, &[]).await.unwrap().get(0);
    browser.goto(&format!("{root}{first_link}")).await;
    browser.wait_for_text("main h1", "Endpoints").await;
    assert_eq!(browser.url().await, format!("{root}/"));
    viewport(&browser, 1200, 800).await;
    let cookie = browser.cookie("walhook_portal").await.expect("a session");
    assert!(cookie.http_only);
    assert!(browser.source().await.contains("hooks.acme.example/old"));
    assert!(!browser.source().await.contains("globex"));

    // add an endpoint: the receiver's loopback URL, every event type
    browser.click("a.button[href='/endpoints/new']").await;
    browser.wait_for("input[name=url]").await;
    assert!(
        browser
            .exists("input[name=event_types][value='order.created']")
            .await
    );
    assert!(
        browser
            .exists("select[name=pin] option[value='order.created=1']")
            .await
    );
    assert!(browser.exists("input[name=verify]").await);
    let url = rx.url("/acme");
    browser.type_into("input[name=url]", &url).await;
    browser
        .type_into("input[name=description]", "Order notifications")
        .await;
    screenshot(&browser, "new-endpoint").await;
    browser.click("form.card button").await;
    browser
        .wait_until("the endpoint is added or refused", || async {
            browser.url().await.contains("/endpoints/")
                || browser.exists(".error, section.message").await
        })
        .await;
    if let Some(error) = browser.try_find(".error, section.message").await {
        panic!("the endpoint was refused: {}", error.text().await);
    }
    let id = id_in_url(&browser, "/endpoints/").await;
    browser
        .wait_for_text("main h1", &format!("Endpoint {id}"))
        .await;
    let (tenant, stored_url, secret): (String, String, String) = {
        let r = superuser
            .query_one(
                "select tenant, url, secret from walhook.endpoints where id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(
        (tenant.as_str(), stored_url.as_str()),
        ("acme", url.as_str())
    );
    assert!(!browser.source().await.contains(&secret), "masked");

    // the secret, revealed by a POST, is what the receiver verifies with
    browser.click("form[action$='/reveal'] button").await;
    assert_eq!(browser.wait_for("#secret").await.text().await, secret);
    rx.set_secret("/acme", &secret);

    // a test event: delivered, signed, shown with its attempt
    browser.click("form[action$='/test'] button").await;
    let delivered = id_in_url(&browser, "/deliveries/").await;
    wait_for_status(&browser, "succeeded").await;
    assert!(browser.text("main").await.contains("walhook.test"));
    assert_eq!(status_codes(&browser).await, ["200"]);
    let received = rx.received();
    assert_eq!(received.len(), 1, "one request");
    assert_eq!(received[0].path, "/acme");
    assert_eq!(received[0].verified, Some(true), "signature verified");

    // another test event while the receiver fails: dead after its attempts, each shown with the response
    failing.store(true, Ordering::SeqCst);
    browser.goto(&format!("{root}/endpoints/{id}")).await;
    browser.click("form[action$='/test'] button").await;
    let failed = id_in_url(&browser, "/deliveries/").await;
    assert_ne!(failed, delivered);
    wait_for_status(&browser, "dead").await;
    let failures = status_codes(&browser).await;
    assert!(failures.len() > 1, "retried: {failures:?}");
    assert!(failures.iter().all(|code| code == "500"), "{failures:?}");
    for attempt in &browser.find_all("table tbody tr").await {
        let text = attempt.text().await;
        assert!(text.contains("500") && text.contains("not yet"), "{text}");
    }

    // resent from its page once the receiver works: succeeds, verified
    failing.store(false, Ordering::SeqCst);
    browser.click("form[action$='/resend'] button").await;
    wait_for_status(&browser, "succeeded").await;
    assert_eq!(
        browser.url().await,
        format!("{root}/deliveries/{failed}"),
        "back on the delivery's page"
    );
    let codes = status_codes(&browser).await;
    assert_eq!(
        codes.len(),
        failures.len() + 1,
        "one more attempt: {codes:?}"
    );
    assert_eq!(codes.iter().filter(|c| *c == "200").count(), 1, "{codes:?}");
    let ok: Vec<_> = rx
        .received()
        .into_iter()
        .filter(|r| r.status_sent == 200)
        .collect();
    assert_eq!(ok.len(), 2, "the test event and the resent one");
    assert!(ok.iter().all(|r| r.verified == Some(true)));
    screenshot(&browser, "delivery").await;

    // the log, the endpoint's page and the list show it all
    browser.goto(&format!("{root}/deliveries")).await;
    browser.wait_for_text("main h1", "Deliveries").await;
    for d in [delivered, failed] {
        assert!(browser.exists(&format!("a[href='/deliveries/{d}']")).await);
    }
    screenshot(&browser, "deliveries").await;
    browser.goto(&format!("{root}/endpoints/{id}")).await;
    browser
        .wait_for_text("main h1", &format!("Endpoint {id}"))
        .await;
    assert!(browser.text(".facts").await.contains("Order notifications"));
    screenshot(&browser, "endpoint").await;
    browser.goto(&format!("{root}/")).await;
    browser.wait_for_text("main h1", "Endpoints").await;
    assert!(browser.text("table").await.contains(&url));
    screenshot(&browser, "endpoints").await;

    // globex's endpoint and delivery, by URL, from acme's session: not found, nothing of globex shown
    for path in [
        format!("/endpoints/{globex}"),
        format!("/endpoints/{globex}/edit"),
        format!("/deliveries/{globex_delivery}"),
    ] {
        browser.goto(&format!("{root}{path}")).await;
        assert_eq!(message_title(&browser).await, "Not found", "{path}");
        assert!(!browser.source().await.contains("globex"), "{path}");
    }

    // a used link and an expired one: the refusal page
    browser.goto(&format!("{root}{first_link}")).await;
    assert_eq!(message_title(&browser).await, "Link not valid");
    let expired = link(&superuser, Some("acme")).await;
    superuser
        .execute(
            "update walhook.portal_links set expires_at = now() - interval '1 second' where used_at is null",
            &[],
        )
        .await
        .unwrap();
    browser.delete_cookies().await;
    browser.goto(&format!("{root}{expired}")).await;
    assert_eq!(message_title(&browser).await, "Link not valid");
    assert!(browser.cookie("walhook_portal").await.is_none());
    browser.goto(&format!("{root}/")).await;
    assert_eq!(message_title(&browser).await, "Session expired");

    // the operator's overview: every tenant's endpoints
    let ops = pg.client_as("ops").await;
    browser
        .goto(&format!("{root}{}", link(&ops, None).await))
        .await;
    browser.wait_for_text("main h1", "Overview").await;
    let overview = browser.text("main").await;
    assert!(overview.contains("acme") && overview.contains("globex"));
    assert!(overview.contains(&url));
    screenshot(&browser, "operator").await;

    browser.quit();
    web.stop().await;
    daemon.stop().await;
}
