// table() in headless Chromium against the real fjord-server and fjord-consumer, on the Kafka
// and Redis of ci/services.sh, with a table endpoint (`"mode": "table"`) over a topic of three
// partitions: the page's rows equal the server's (its snapshot as curl would read it) from the
// snapshot through live upserts, tombstones and records without a key; a server killed and
// restarted resumes the stream without a new snapshot, and the rows stay right; `keys` and
// `fields` make a table of some rows with some fields. Run by ci/test-browser.sh.

import assert from "node:assert/strict";
import { rm } from "node:fs/promises";
import { after, before, test } from "node:test";

import {
  bin,
  kafka,
  freePort,
  launchBrowser,
  mintToken,
  openPage,
  Proc,
  readSnapshot,
  services,
  setupKeys,
  startServer,
  startStaticServer,
  tempDir,
  unique,
  until,
  writeManifest,
} from "./harness.mjs";

const TIMEOUT = 60_000;
const ENDPOINT = unique("e2e-table");
const TOPIC = `${ENDPOINT}-topic`;

let dir, keys, statics, port, manifest, consumer, server, producer, browser, token;

before(async () => {
  const { brokers, redis } = services();
  dir = await tempDir("fjord-e2e-table-");
  keys = await setupKeys(dir);
  statics = await startStaticServer(keys);
  port = await freePort();
  manifest = writeManifest(dir, {
    brokers,
    redis,
    port,
    origin: statics.origin,
    group: unique("e2e-group"),
    endpoints: { [ENDPOINT]: { topic: TOPIC, mode: "table" } },
  });
  producer = await kafka(brokers);
  await producer.createTopics([TOPIC], 3);
  consumer = new Proc("fjord-consumer", bin("fjord-consumer"), ["--manifest", manifest], dir);
  server = await startServer(manifest, port, dir);
  browser = await launchBrowser();
  token = await mintToken(keys, { endpoints: [ENDPOINT] });
});

after(async () => {
  await browser?.close();
  await producer?.close();
  await server?.stop();
  await consumer?.stop();
  await statics?.close();
  if (dir && !process.env.FJORD_E2E_KEEP) await rm(dir, { recursive: true, force: true });
});

/** What the rows must be after `records`, by key: the last value of each, tombstones deleting. */
class Model {
  rows = new Map();
  apply(records) {
    for (const { key, value } of records) {
      if (key === null) continue;
      if (value === null) this.rows.delete(key);
      else this.rows.set(key, value);
    }
  }
  get object() {
    return sorted(Object.fromEntries(this.rows));
  }
}

function sorted(object) {
  return Object.fromEntries(Object.entries(object).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** The server's rows now, read as a plain SSE client reads the snapshot. */
async function serverRows(query = "") {
  const snapshot = await readSnapshot(`http://127.0.0.1:${port}/v1/streams/${ENDPOINT}${query}`, {
    endpoint: ENDPOINT,
    headers: { authorization: `Bearer ${token}` },
  });
  return { ...snapshot, object: sorted(Object.fromEntries(snapshot.rows.map((r) => [r.key, r.value]))) };
}

async function tablePage(query = {}) {
  const q = new URLSearchParams({ server: `http://127.0.0.1:${port}`, endpoint: ENDPOINT });
  for (const [name, value] of Object.entries(query)) for (const v of [value].flat()) q.append(name, v);
  return await openPage(browser, `${statics.origin}/table.html?${q}`);
}

async function describe(page) {
  const state = await page.evaluate(() => window.fjordTable);
  return `state ${JSON.stringify({ ...state, changes: state.changes.slice(-20) })}\nconsole:\n${page.consoleLines.join("\n")}\n` +
    `server:\n${server.tail(20)}\nconsumer:\n${consumer.tail(20)}`;
}

/** Waits until the page's rows are `want` (by key, compared as JSON). */
async function waitRows(page, want, what) {
  try {
    await page.waitForFunction((w) => {
      const have = window.fjordRows();
      const keys = Object.keys(have).sort();
      return JSON.stringify(keys) === JSON.stringify(Object.keys(w)) && keys.every((k) => JSON.stringify(have[k]) === JSON.stringify(w[k]));
    }, want, { timeout: TIMEOUT });
  } catch (error) {
    throw new Error(`${what}: ${error.message}\nwant ${JSON.stringify(want)}\nhave ${JSON.stringify(await page.evaluate(() => window.fjordRows()))}\n${await describe(page)}`);
  }
}

const model = new Model();

test("table(): the page's rows are the server's, from the snapshot through upserts, tombstones and records without a key", { timeout: 3 * TIMEOUT }, async () => {
  const before = [];
  for (let n = 0; n < 12; n++) before.push({ key: `k${String(n).padStart(2, "0")}`, value: { n, v: 1 } });
  before.push({ key: "k03", value: null }, { key: "k07", value: null }, { key: "k05", value: { n: 5, v: 2 } });
  before.push({ key: null, value: { note: "no key, no row" } });
  await producer.send(TOPIC, before);
  model.apply(before);
  await until("the server's rows", async () => JSON.stringify((await serverRows()).object) === JSON.stringify(model.object), TIMEOUT, 250);
  const first = await serverRows();
  assert.equal(first.rows.length, 10);
  assert.deepEqual(first.rows.filter((r) => r.hasId), [], "snapshot rows carry no id: line");
  assert.equal(first.prelude, "0-0");
  assert.match(first.id, /^\d+-\d+$/);

  const page = await tablePage();
  try {
    await page.waitForFunction(() => window.fjordTable.ready, null, { timeout: TIMEOUT });
  } catch (error) {
    throw new Error(`${error.message}\n${await describe(page)}`);
  }
  let state = await page.evaluate(() => window.fjordTable);
  assert.deepEqual(state.ready.size, 10, JSON.stringify(state.ready));
  assert.deepEqual(sorted(await page.evaluate(() => window.fjordRows())), model.object);
  assert.deepEqual(state.changes.map((c) => [c.type, c.size]), [["snapshot", 10]]);
  assert.equal(await page.locator("#rows li").count(), 10);

  // Live: an update, a tombstone, a new key, a tombstone of a key the table lacks, no key.
  const live = [
    { key: "k00", value: { n: 0, v: 3 } },
    { key: "k01", value: null },
    { key: "k12", value: { n: 12, v: 1 } },
    { key: "k99", value: null },
    { key: null, value: { note: "live, no key" } },
    { key: "k05", value: { n: 5, v: 3 } },
  ];
  await producer.send(TOPIC, live);
  model.apply(live);
  await waitRows(page, model.object, "the live records");
  await page.waitForFunction(() => window.fjordTable.keyless.length >= 1, null, { timeout: TIMEOUT });
  assert.deepEqual((await serverRows()).object, model.object, "the server's snapshot now");
  state = await page.evaluate(() => window.fjordTable);
  assert.deepEqual(state.keyless, [{ note: "live, no key" }], "a record without a key goes to onRecord, the one before the page in no snapshot");
  const changes = state.changes.slice(1).map((c) => `${c.type} ${c.key}`).sort();
  assert.deepEqual(changes, ["delete k01", "upsert k00", "upsert k05", "upsert k12"]);
  assert.deepEqual(state.errors, []);
  assert.deepEqual(state.tokenCalls, ["connect"]);
  assert.equal(await page.locator("#rows li").count(), model.rows.size);
  await page.close();
});

test("a server killed and restarted: the resume is served from the stream, no new snapshot, the rows stay right", { timeout: 3 * TIMEOUT }, async () => {
  const page = await tablePage();
  await page.waitForFunction(() => window.fjordTable.ready, null, { timeout: TIMEOUT });
  await waitRows(page, model.object, "the snapshot");
  await server.stop("SIGKILL");
  await page.waitForFunction(() => window.fjordTable.statuses.includes("reconnecting:error"), null, { timeout: TIMEOUT });
  const down = [
    { key: "k02", value: null },
    { key: "k04", value: { n: 4, v: 9 } },
    { key: "k13", value: { n: 13, v: 1 } },
  ];
  await producer.send(TOPIC, down);
  model.apply(down);
  server = await startServer(manifest, port, dir);
  await waitRows(page, model.object, "the records made while the server was down");
  const after = [{ key: "k13", value: null }, { key: "k08", value: { n: 8, v: 2 } }];
  await producer.send(TOPIC, after);
  model.apply(after);
  await waitRows(page, model.object, "the records after the restart");
  assert.deepEqual((await serverRows()).object, model.object);
  const state = await page.evaluate(() => window.fjordTable);
  assert.deepEqual(state.changes.filter((c) => c.type === "snapshot").length, 1, "the resume brought no new snapshot");
  assert.ok(state.statuses.filter((s) => s === "open:opened").length >= 2, state.statuses.join(" "));
  assert.ok(state.errors.every((e) => !e.fatal), JSON.stringify(state.errors));
  await page.close();
});

test("keys and fields: a table of some rows, with some fields", { timeout: TIMEOUT }, async () => {
  const page = await tablePage({ key: ["k04", "k06", "k03"], fields: "v" });
  await page.waitForFunction(() => window.fjordTable.ready, null, { timeout: TIMEOUT });
  const want = sorted(Object.fromEntries(["k04", "k06"].map((k) => [k, { v: model.rows.get(k).v }])));
  assert.deepEqual(sorted(await page.evaluate(() => window.fjordRows())), want);
  assert.deepEqual((await serverRows("?key=k04&key=k06&key=k03&fields=v")).object, want);
  await producer.send(TOPIC, [{ key: "k06", value: { n: 6, v: 7 } }, { key: "k10", value: { n: 10, v: 7 } }, { key: "k04", value: null }]);
  model.apply([{ key: "k06", value: { n: 6, v: 7 } }, { key: "k10", value: { n: 10, v: 7 } }, { key: "k04", value: null }]);
  await waitRows(page, { k06: { v: 7 } }, "k06 set and k04 deleted, k10 not asked for");
  await page.close();
});
