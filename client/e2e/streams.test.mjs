// Headless Chromium against the real fjord-server and fjord-consumer, on the Kafka and Redis
// of ci/services.sh: a page on another origin loads dist/fjord-client.js and streams with
// JWTs minted by `fjord token`; a page on an origin the server does not allow, or aimed at no
// server, says which; a stale saved id is dropped; `online` and a page shown again cut a grown
// backoff short; `filter` and `fields` narrow and trim what the page gets. The server
// compresses streams (`server.compression`), so Chromium decodes every one of them as gzip,
// each event as it arrives, across kills, drains and restarts. Run by ci/test-browser.sh.

import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { rm } from "node:fs/promises";
import { after, before, test } from "node:test";

import {
  freePort,
  kafka,
  launchBrowser,
  openPage,
  Proc,
  services,
  setupKeys,
  startServer,
  startStaticServer,
  tempDir,
  unique,
  bin,
  until,
  writeManifest,
} from "./harness.mjs";

const ENDPOINTS = {
  receive: unique("e2e-receive"),
  restart: unique("e2e-restart"),
  expiry: unique("e2e-expiry"),
  other: unique("e2e-other"),
  stale: unique("e2e-stale"),
  wake: unique("e2e-wake"),
  filter: unique("e2e-filter"),
};
const TIMEOUT = 60_000;

let dir, keys, statics, port, manifest, consumer, server, producer, browser;

before(async () => {
  const { brokers, redis } = services();
  dir = await tempDir("fjord-e2e-");
  keys = await setupKeys(dir);
  statics = await startStaticServer(keys);
  port = await freePort();
  const topics = Object.fromEntries(Object.keys(ENDPOINTS).map((name) => [name, `${ENDPOINTS[name]}-topic`]));
  manifest = writeManifest(dir, {
    brokers,
    redis,
    port,
    origin: statics.origin,
    group: unique("e2e-group"),
    endpoints: Object.fromEntries(Object.keys(ENDPOINTS).map((name) => [ENDPOINTS[name], topics[name]])),
  });
  const compressed = JSON.parse(readFileSync(manifest, "utf8"));
  compressed.server.compression = true;
  writeFileSync(manifest, JSON.stringify(compressed, null, 2));
  producer = await kafka(brokers);
  await producer.createTopics(Object.values(topics), 3);
  producer.topics = topics;
  consumer = new Proc("fjord-consumer", bin("fjord-consumer"), ["--manifest", manifest], dir);
  server = await startServer(manifest, port, dir);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await producer?.close();
  await server?.stop();
  await consumer?.stop();
  await statics?.close();
  if (dir && !process.env.FJORD_E2E_KEEP) await rm(dir, { recursive: true, force: true });
});

/** Opens the test page on `name`'s endpoint (served from `origin`, by default the one the server allows). */
async function streamPage(name, query = {}, origin = statics.origin) {
  const q = new URLSearchParams({ server: `http://127.0.0.1:${port}`, endpoint: ENDPOINTS[name], ...query });
  const page = await openPage(browser, `${origin}/page.html?${q}`);
  return page;
}

/** The page's state and console, for failure messages. */
async function describePage(page) {
  const state = await page.evaluate(() => window.fjordTest);
  return `state ${JSON.stringify({ ...state, records: state.records.length })}\nconsole:\n${page.consoleLines.join("\n")}`;
}

async function waitOpen(page) {
  await page.waitForFunction(() => document.getElementById("status").textContent === "open", null, { timeout: TIMEOUT });
}

/** Waits until the page holds `count` records, then returns its state. */
async function waitRecords(page, count) {
  try {
    await page.waitForFunction((n) => window.fjordTest.records.length >= n, count, { timeout: TIMEOUT });
  } catch (error) {
    const state = await page.evaluate(() => window.fjordTest);
    throw new Error(
      `${error.message}\npage has ${state.records.length}/${count} records; statuses ${state.statuses.join(" ")}; ` +
        `errors ${JSON.stringify(state.errors)}\nconsole:\n${page.consoleLines.join("\n")}\n` +
        `server:\n${server.tail(20)}\nconsumer:\n${consumer.tail(20)}`,
    );
  }
  return await page.evaluate(() => window.fjordTest);
}

/** Every seq in 0..count-1 exactly once, ids unique, and in order per key. */
function assertComplete(records, count) {
  const seqs = records.map((r) => r.seq);
  const missing = [];
  for (let seq = 0; seq < count; seq++) if (!seqs.includes(seq)) missing.push(seq);
  assert.deepEqual(missing, [], "records missing");
  assert.equal(records.length, count, "duplicate records");
  assert.equal(new Set(records.map((r) => r.id)).size, count, "duplicate ids");
  const byKey = new Map();
  for (const r of records) {
    const last = byKey.get(r.key) ?? -1;
    assert.ok(r.seq > last, `key ${r.key}: seq ${r.seq} after ${last}`);
    byKey.set(r.key, r.seq);
  }
}

/** Produces records one after another until `stop()`; `done` resolves to how many. */
function produceUntilStopped(topic, everyMs) {
  let stopped = false;
  let produced = 0;
  const done = (async () => {
    while (!stopped) {
      await producer.produce(topic, produced, produced + 1);
      produced++;
      await new Promise((r) => setTimeout(r, everyMs));
    }
    return produced;
  })();
  return { stop: () => ((stopped = true), done), get produced() { return produced; } };
}

test("a page on another origin receives every produced record, in order per key, gzip-compressed", { timeout: 2 * TIMEOUT }, async () => {
  const encodings = [];
  const onResponse = (response) => {
    if (new URL(response.url()).pathname.startsWith("/v1/streams/")) {
      encodings.push(response.headers()["content-encoding"] ?? "identity");
    }
  };
  browser.context.on("response", onResponse);
  const page = await streamPage("receive");
  await waitOpen(page);
  await producer.produce(producer.topics.receive, 0, 60);
  const state = await waitRecords(page, 60);
  browser.context.off("response", onResponse);
  assert.ok(encodings.length > 0 && encodings.every((e) => e === "gzip"), `stream responses coded ${encodings}`);
  assertComplete(state.records, 60);
  // The DOM shows them too, in the order they arrived.
  const dom = await page.$$eval("#records li", (lis) => lis.map((li) => [li.dataset.key, Number(li.dataset.seq)]));
  assert.deepEqual(dom, state.records.map((r) => [r.key, r.seq]));
  assert.deepEqual(state.tokenCalls, ["connect"]);
  assert.deepEqual(state.errors, []);
  await page.close();
});

test("the server is killed and restarted mid-stream, then drained and restarted: nothing missed, nothing twice", { timeout: 3 * TIMEOUT }, async () => {
  const page = await streamPage("restart");
  await waitOpen(page);
  const production = produceUntilStopped(producer.topics.restart, 20);
  const status = () => page.evaluate(() => window.fjordTest.statuses);
  const received = () => page.evaluate(() => window.fjordTest.records.length);

  await until("records before the kill", async () => (await received()) >= 20, TIMEOUT);
  await server.stop("SIGKILL");
  const atKill = production.produced;
  await until("the page to notice", async () => (await status()).includes("reconnecting:error"), TIMEOUT);
  // Records produced while no server runs reach the page by replay after the restart.
  await until("records produced while the server is down", async () => production.produced > atKill + 5, TIMEOUT);
  const atRestart = production.produced;
  server = await startServer(manifest, port, dir);
  await until("records produced after the restart", async () => (await received()) > atRestart + 20, TIMEOUT);

  // A drain: fjord.shutdown, then the same port again.
  await server.stop("SIGTERM");
  await until("fjord.shutdown on the page", async () => (await status()).includes("reconnecting:shutdown"), TIMEOUT);
  const atDrain = production.produced;
  server = await startServer(manifest, port, dir);
  await until("records produced after the drain", async () => (await received()) > atDrain + 20, TIMEOUT);

  const count = await production.stop();
  const state = await waitRecords(page, count);
  assertComplete(state.records, count);
  assert.equal(state.gaps.length, 0, "no fjord.gap");
  assert.ok(state.statuses.filter((s) => s === "open:opened").length >= 3, `reopened: ${state.statuses.join(" ")}`);
  assert.ok(state.errors.every((e) => !e.fatal), JSON.stringify(state.errors));
  await page.close();
});

test("an expiring token (ttl 3 s) is refreshed without a gap", { timeout: 3 * TIMEOUT }, async () => {
  const page = await streamPage("expiry", { ttl: "3" });
  await waitOpen(page);
  const production = produceUntilStopped(producer.topics.expiry, 50);
  const state = () => page.evaluate(() => window.fjordTest);
  // Two expiries mid-stream: fjord.expired, getToken({ reason: "expired" }), resumed by id.
  await until("two token refreshes", async () => (await state()).tokenCalls.filter((r) => r === "expired").length >= 2, 4 * TIMEOUT / 3);
  const atSecond = production.produced;
  await until("records after the second refresh", async () => (await state()).records.length > atSecond + 10, TIMEOUT);

  const count = await production.stop();
  const final = await waitRecords(page, count);
  assertComplete(final.records, count);
  assert.ok(final.statuses.includes("reconnecting:expired"), final.statuses.join(" "));
  assert.ok(final.errors.every((e) => !e.fatal), JSON.stringify(final.errors));
  assert.equal(final.tokenCalls[0], "connect");
  // The stream never stalled across a refresh: records kept arriving at the producer's pace.
  const pauses = final.records.slice(1).map((r, i) => r.at - final.records[i].at);
  assert.ok(Math.max(...pauses) < 3000, `longest pause between records ${Math.max(...pauses)} ms`);
  // The harness minted a token for every call, each living 3 s.
  assert.ok(statics.tokenRequests.filter((t) => t.ttl === 3).length >= 3);
  await page.close();
});

for (const [what, query, status, code] of [
  ["a token for another endpoint", { token_endpoint: "somewhere-else" }, 403, "forbidden"],
  ["a token for another audience", { audience: "not-fjord" }, 401, "token_audience"],
]) {
  test(`${what} is refused and the page shows why`, { timeout: TIMEOUT }, async () => {
    // A browser reads a refusal from another origin only if it carries the CORS headers.
    const token = await (await fetch(`${statics.origin}/token?${new URLSearchParams({ endpoint: query.token_endpoint ?? ENDPOINTS.other, ttl: "60", ...(query.audience ? { audience: query.audience } : {}) })}`)).text();
    const refusal = await fetch(`http://127.0.0.1:${port}/v1/streams/${ENDPOINTS.other}`, {
      headers: { Origin: statics.origin, Authorization: `Bearer ${token}` },
    });
    assert.equal(refusal.status, status);
    assert.equal(
      refusal.headers.get("access-control-allow-origin"),
      statics.origin,
      `the ${status} answer has no Access-Control-Allow-Origin, so the page cannot see why it was refused`,
    );
    const page = await streamPage("other", query);
    const error = page.locator("#error");
    try {
      await error.waitFor({ state: "visible", timeout: TIMEOUT / 2 });
    } catch (e) {
      const state = await page.evaluate(() => window.fjordTest);
      throw new Error(`${e.message}\nstate ${JSON.stringify(state)}\nconsole:\n${page.consoleLines.join("\n")}`);
    }
    assert.equal(await error.getAttribute("data-code"), code);
    assert.equal(await error.getAttribute("data-status"), String(status));
    const text = await error.textContent();
    assert.match(text, new RegExp(`^${status} ${code}: .+`));
    assert.equal(await page.locator("#status").textContent(), "closed");
    const state = await page.evaluate(() => window.fjordTest);
    // Refused once, asked for a certainly fresh token, refused again: stopped.
    assert.deepEqual(state.tokenCalls, ["connect", "refused"]);
    assert.equal(state.records.length, 0);
    await page.close();
  });
}

test("a refusal the page cannot read is named CORS, apart from a server that is not there", { timeout: TIMEOUT }, async () => {
  // The same static server under another name: an origin the server does not allow.
  const otherOrigin = statics.origin.replace("127.0.0.1", "localhost");
  const cors = await streamPage("other", {}, otherOrigin);
  const nowhere = await streamPage("other", { server: `http://127.0.0.1:${await freePort()}` });
  for (const [page, code] of [
    [cors, "cors"],
    [nowhere, "network"],
  ]) {
    try {
      await page.waitForFunction(() => window.fjordTest.errors.length >= 2, null, { timeout: TIMEOUT / 2 });
    } catch (error) {
      throw new Error(`${error.message}\n${await describePage(page)}`);
    }
    const state = await page.evaluate(() => window.fjordTest);
    // Every attempt says the same, and none stops the client: the cause may be fixed meanwhile.
    assert.deepEqual(
      state.errors.map((e) => [e.code, e.fatal]),
      state.errors.map(() => [code, false]),
      JSON.stringify(state.errors),
    );
    assert.equal(state.statuses.at(-1), "reconnecting:error");
    if (code === "cors") assert.match(state.errors[0].message, new RegExp(`most likely CORS, the server does not allow the origin ${otherOrigin}$`));
    else assert.match(state.errors[0].message, /^cannot reach http:\/\/127\.0\.0\.1:\d+\/v1\/streams\//);
    await page.close();
  }
});

test("a saved id from another set of endpoints is dropped with a notice, and the stream goes on live", { timeout: TIMEOUT }, async () => {
  const saved = "1-0_2-0"; // two positions; this stream has one endpoint
  const page = await streamPage("stale", { last_event_id: saved });
  await waitOpen(page);
  await producer.produce(producer.topics.stale, 0, 10);
  const state = await waitRecords(page, 10);
  assertComplete(state.records, 10);
  assert.equal(state.notices.length, 1, JSON.stringify(state.notices));
  const [notice] = state.notices;
  assert.equal(notice.code, "stale_id");
  assert.equal(notice.lastEventId, saved);
  assert.match(notice.message, /2 positions, but this stream has 1 endpoint/);
  assert.deepEqual(state.errors, []);
  assert.deepEqual(state.statuses.slice(0, 3), ["connecting:start", "reconnecting:stale_id", "open:opened"]);
  await page.close();
});

test("with filter and fields the page receives only the matching records, with only those fields", { timeout: TIMEOUT }, async () => {
  const page = await streamPage("filter", { filter: "value.total_cents >= 1000", fields: "id,total_cents" });
  await waitOpen(page);
  // Even seqs match (seq 0 at exactly 1000), odd ones do not, but the last three match: one per
  // key, so once they are on the page every record of their key before them would be too.
  const last = 30;
  const matches = (seq) => seq % 2 === 0 || seq >= last;
  await producer.produce(producer.topics.filter, 0, last + 3, {
    value: (seq) => ({ id: `order-${seq}`, seq, status: "placed", total_cents: matches(seq) ? 1000 + seq : 999 }),
  });
  const expected = [];
  for (let seq = 0; seq < last + 3; seq++) if (matches(seq)) expected.push(seq);
  const state = await waitRecords(page, expected.length);
  // `seq` itself is projected away: the id carries it.
  const seqOf = (record) => Number(record.value.id.replace("order-", ""));
  assert.deepEqual(state.records.map(seqOf).sort((a, b) => a - b), expected, "only the matching records, each once");
  for (const record of state.records) {
    assert.deepEqual(record.value, { id: `order-${seqOf(record)}`, total_cents: 1000 + seqOf(record) }, "only id and total_cents");
  }
  assert.deepEqual(state.errors, []);
  assert.deepEqual(state.tokenCalls, ["connect"]);
  await page.close();
});

test("online, and a hidden page shown again, reconnect at once instead of sitting out the backoff", { timeout: 4 * TIMEOUT }, async () => {
  const page = await streamPage("wake");
  await waitOpen(page);
  const production = produceUntilStopped(producer.topics.wake, 30);
  try {
    await wakeTwice(page);
  } finally {
    await production.stop();
  }
  const state = await waitRecords(page, production.produced);
  assertComplete(state.records, production.produced);
  assert.ok(state.errors.every((e) => !e.fatal && e.code === "network"), JSON.stringify(state.errors));
  await page.close();
});

/** Drops the page's stream twice, and wakes it once with `online` and once by showing it again. */
async function wakeTwice(page) {
  const log = () => page.evaluate(() => window.fjordTest.statusLog);
  const isStream = (url) => url.port === String(port) && url.pathname.startsWith("/v1/streams");

  /** Kills the stream server-side and fails every new attempt until the backoff has grown. */
  async function dropAndHold() {
    await page.route(isStream, (route) => route.abort("internetdisconnected"));
    await server.stop("SIGKILL");
    server = await startServer(manifest, port, dir);
    const pending = await until(
      "a reconnect delay of 2 s or more",
      async () => {
        const last = (await log()).at(-1);
        return last?.status === "reconnecting:error" && last.delayMs >= 2000 && last;
      },
      TIMEOUT,
    );
    await page.unroute(isStream);
    return pending;
  }

  /** After `wake()`, the page reconnects with `reason` and opens before the pending delay ran out. */
  async function assertWokenBy(reason, pending, wake) {
    await wake();
    const opened = await until(`open again after ${reason}`, async () => {
      const entries = (await log()).filter((e) => e.at >= pending.at);
      const woken = entries.findIndex((e) => e.status === `reconnecting:${reason}`);
      return woken >= 0 && entries.slice(woken).find((e) => e.status === "open:opened");
    }, TIMEOUT);
    assert.ok(opened.at < pending.at + pending.delayMs, `opened ${opened.at - pending.at} ms after a ${pending.delayMs} ms delay began`);
    // One attempt, the woken one: the pending timer did not fire another.
    const since = (await log()).filter((e) => e.at >= pending.at).map((e) => e.status);
    assert.deepEqual(since.slice(0, 3), ["reconnecting:error", `reconnecting:${reason}`, "open:opened"], since.join(" "));
  }

  await assertWokenBy("online", await dropAndHold(), () => page.evaluate(() => window.dispatchEvent(new Event("online"))));

  const pending = await dropAndHold();
  await assertWokenBy("visible", pending, async () => {
    await page.evaluate(() => {
      let state = "hidden";
      Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
      // Hidden: nothing happens.
      document.dispatchEvent(new Event("visibilitychange"));
      state = "visible";
      document.dispatchEvent(new Event("visibilitychange"));
    });
  });
}
