// A walhook receiver: verify, record once per webhook-id, answer at once, process in the background.
//
// node's http module and the official Standard Webhooks library only (npm install standardwebhooks).
// Settings from the environment: WEBHOOK_SECRET (the endpoint's whsec_...), PORT (3000; 0 picks a free
// one), INBOX (the folder that records each event once, ./inbox), EVENTS_LOG (where the stand-in for your
// work appends "webhook-id type" per processed event, events.log).
import { randomUUID } from "node:crypto";
import { appendFile, link, mkdir, open, readFile, readdir, stat, unlink, writeFile } from "node:fs/promises";
import { createServer } from "node:http";
import { join } from "node:path";
import { Webhook, WebhookVerificationError } from "standardwebhooks";

const webhook = new Webhook(process.env.WEBHOOK_SECRET);
const inbox = process.env.INBOX ?? "inbox";
const eventsLog = process.env.EVENTS_LOG ?? "events.log";

// The inbox holds one file per webhook-id, `<id>.json` with the body, and `<id>.done` once processed.
// link() creates the name only if it is absent, atomically, with the whole body: that is the unique
// constraint. Returns false for a webhook-id already recorded.
async function record(webhookId, body) {
  const partial = join(inbox, `.partial-${randomUUID()}`);
  const file = await open(partial, "wx");
  try {
    await file.writeFile(body);
    await file.sync(); // recorded means on disk, before walhook hears 2xx
  } finally {
    await file.close();
  }
  try {
    await link(partial, join(inbox, `${encodeURIComponent(webhookId)}.json`));
    return true;
  } catch (error) {
    if (error.code === "EEXIST") return false;
    throw error;
  } finally {
    await unlink(partial);
  }
}

// Answers 204 once the event is recorded, 401 when it does not verify, 503 when it cannot be recorded.
async function receive(request) {
  const chunks = [];
  for await (const chunk of request) chunks.push(chunk);
  const body = Buffer.concat(chunks);
  try {
    // checks the timestamp (5 minutes) and every "v1," signature in the header: during a secret
    // rotation walhook sends one per valid secret, so the old and the new one both verify
    webhook.verify(body, request.headers);
  } catch (error) {
    const status = error instanceof WebhookVerificationError ? 401 : 400;
    return [status, `invalid webhook: ${error.message}`];
  }
  const webhookId = request.headers["webhook-id"];
  try {
    if (await record(webhookId, body)) {
      queue.push(webhookId);
      work();
    }
  } catch (error) {
    // not recorded: ask walhook to come back later (429 and 503 honour Retry-After)
    console.error(`inbox unavailable: ${error.message}`);
    return [503, "try again later", { "retry-after": "30" }];
  }
  // a duplicate gets 2xx too: it is already recorded, so walhook can stop sending it
  return [204];
}

const server = createServer((request, response) => {
  const answer = ([status, text = "", headers = {}]) => response.writeHead(status, headers).end(text);
  if (request.method !== "POST" || request.url !== "/webhooks") return answer([404, "not found"]);
  receive(request).then(answer, (error) => answer([500, error.message]));
});

// Your work goes here: one call per event, in the order the events were received.
async function handle(webhookId, event) {
  const { type, data } = event;
  if (type === "walhook.endpoint.disabled") {
    const reason = data.reason ?? "no reason given";
    console.error(`ALERT endpoint ${data.endpoint_id} disabled (${data.cause}): ${reason}`);
  } else if (type === "walhook.delivery.dead") {
    console.error(
      `ALERT ${data.event_type} ${data.webhook_id} to endpoint ${data.endpoint_id} dead after` +
        ` ${data.attempts} attempts: ${data.last_error}`,
    );
  } else if (type.startsWith("walhook.")) {
    console.error(`walhook: ${type} ${JSON.stringify(data)}`);
  }
  await appendFile(eventsLog, `${webhookId} ${type}\n`);
}

// One worker takes recorded events oldest first; an event whose processing fails stays in the inbox
// and is tried again a minute later.
const queue = [];
let working = false;
async function work() {
  if (working) return;
  working = true;
  while (queue.length > 0) {
    const webhookId = queue.shift();
    const name = join(inbox, encodeURIComponent(webhookId));
    try {
      await handle(webhookId, JSON.parse(await readFile(`${name}.json`, "utf8")));
      await writeFile(`${name}.done`, "");
    } catch (error) {
      console.error(`processing ${webhookId} failed, to be tried again: ${error.message}`);
      setTimeout(() => {
        queue.push(webhookId);
        work();
      }, 60_000);
    }
  }
  working = false;
}

// Events a previous run recorded but did not process come first, in the order they were received.
await mkdir(inbox, { recursive: true });
const names = new Set(await readdir(inbox));
const left = [];
for (const name of names) {
  if (name.endsWith(".json") && !names.has(name.replace(/\.json$/, ".done"))) {
    const { mtimeMs } = await stat(join(inbox, name));
    left.push({ id: decodeURIComponent(name.slice(0, -".json".length)), at: mtimeMs });
  }
}
queue.push(...left.sort((a, b) => a.at - b.at).map((event) => event.id));
work();

server.listen(Number(process.env.PORT ?? 3000), "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${server.address().port}/webhooks`);
});
