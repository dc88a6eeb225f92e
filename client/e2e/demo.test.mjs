// The demo page of `fjord dev` in headless Chromium: it loads the embedded @fjord/client from
// /fjord-client.js, is full of recent history at once, opens the driver map on the snapshot
// of the table endpoint `drivers` (every driver the server has, as curl reads the snapshot
// too), shows orders appearing and drivers
// moving with labels that never overlap, resumes after "Drop connection" with no record
// missed, follows one driver on a key-filtered connection, narrows orders with a value filter
// and a field list on the server (and shows the bytes that saved, and a bad filter's 400),
// shows the open connections, puts the live data first on a phone, asks nothing the server lacks (no 404, favicon
// included), and with `fjord dev --auth` streams with the token of the banner's address.
// Needs no Kafka or Redis (fjord dev runs its own). FJORD_E2E_SCREENSHOTS=DIR keeps screenshots.

import assert from "node:assert/strict";
import { readFile, rm } from "node:fs/promises";
import { createServer } from "node:http";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { bin, freePort, launchBrowser, openPage, Proc, readSnapshot, repoDir, tempDir, until } from "./harness.mjs";

const TIMEOUT = 60_000;
let dir, dev, port, browser;

before(async () => {
  dir = await tempDir("fjord-e2e-dev-");
  port = await freePort();
  dev = new Proc("fjord-dev", bin("fjord"), ["dev", "--port", String(port)], dir);
  await until(
    "fjord dev to serve",
    async () => {
      if (!dev.running) throw new Error(`fjord dev exited:\n${dev.tail()}`);
      return (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200;
    },
    TIMEOUT,
  );
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await dev?.stop();
  if (dir && !process.env.FJORD_E2E_KEEP) await rm(dir, { recursive: true, force: true });
});

test("fjord dev serves the client it embeds", async () => {
  const res = await fetch(`http://127.0.0.1:${port}/fjord-client.js`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /^text\/javascript/);
  assert.match(await res.text(), /export\s*\{[^}]*\bconnect\b/);
});

/** Opens the demo page, noting every answer of 400 or more (a missing favicon, say). */
async function openDemo(url, viewport) {
  const page = await browser.context.newPage();
  if (viewport) await page.setViewportSize(viewport);
  page.consoleLines = [];
  page.failedRequests = [];
  page.on("console", (m) => page.consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => page.consoleLines.push(`pageerror: ${e.message}`));
  page.on("response", (r) => r.status() >= 400 && page.failedRequests.push(`${r.status()} ${r.url()}`));
  await page.goto(url);
  return page;
}

function explain(error, page) {
  return new Error(`${error.message}\nconsole:\n${page.consoleLines.join("\n")}\nfjord dev:\n${dev.tail(20)}`);
}

test("the demo page is full of recent history at once, with no request the server lacks", { timeout: TIMEOUT }, async () => {
  const page = await openDemo(`http://127.0.0.1:${port}/`);
  const opened = Date.now();
  try {
    // orders starts at the oldest record it keeps, and fjord dev writes 40 s of history at
    // start; drivers is a table endpoint, whose snapshot has every driver: the board and the
    // map fill from the first response.
    await page.waitForFunction(
      () => document.querySelectorAll("#orders .order").length >= 20 && document.querySelectorAll("#drivers-layer .drv").length === 8,
      null,
      { timeout: 5_000 },
    );
  } catch (error) {
    throw explain(error, page);
  }
  console.log(`full page (20 orders, 8 drivers) ${Date.now() - opened} ms after opening it`);
  await page.waitForTimeout(500); // the favicon and /dev.json are asked for by now
  assert.deepEqual(page.failedRequests, []);
  assert.deepEqual(page.consoleLines.filter((l) => /^(error|pageerror)/.test(l)), []);
  assert.match(await page.locator("#produce-one").textContent(), /\| kcat -b 127\.0\.0\.1:\d+ -t orders -k order-mine -P$/);
  await page.close();
});

test("the driver map opens on the snapshot of the table endpoint drivers: every driver the server has, at once", { timeout: 2 * TIMEOUT }, async () => {
  // A driver could come or go between the page's snapshot and the one read here: then again.
  for (let attempt = 1; ; attempt++) {
    const page = await openDemo(`http://127.0.0.1:${port}/`);
    const opened = Date.now();
    let snapshot;
    try {
      snapshot = await page.waitForFunction(() => window.fjordDemo.snapshots[0], null, { timeout: 10_000 }).then((h) => h.jsonValue());
    } catch (error) {
      throw explain(error, page);
    }
    const tookMs = Date.now() - opened;
    // As a plain SSE client reads it: the rows between snapshot_start and snapshot_end.
    const server = await readSnapshot(`http://127.0.0.1:${port}/v1/streams/drivers`, { endpoint: "drivers" });
    const serverKeys = server.rows.map((r) => r.key).sort();
    const pageKeys = [...snapshot.keys].sort();
    if (JSON.stringify(pageKeys) !== JSON.stringify(serverKeys) && attempt < 3) {
      console.log(`attempt ${attempt}: the page's snapshot ${pageKeys} and the server's ${serverKeys} differ; again`);
      await page.close();
      continue;
    }
    assert.ok(server.rows.length >= 1, "the server has driver rows");
    assert.deepEqual(server.rows.filter((r) => r.hasId), [], "snapshot rows carry no id: line");
    assert.equal(server.prelude, "0-0", "a table endpoint's position is 0-0 until its snapshot ends");
    assert.match(server.id, /^\d+-\d+$/);
    // Right after snapshot_end, the map holds one driver per row the server has.
    assert.deepEqual(pageKeys, serverKeys);
    assert.equal(snapshot.rows, server.rows.length);
    assert.equal(snapshot.drivers, server.rows.length);
    assert.match(snapshot.id, /^\d+-\d+_\d+-\d+$/, "the composite id of orders + drivers");
    assert.match(await page.locator("#drivers-snapshot").textContent(), new RegExp(`^snapshot: ${server.rows.length} drivers? in \\d+ ms$`));
    assert.equal(await page.locator("#st-drivers").textContent(), String(await page.locator("#drivers-layer .drv").count()));
    console.log(`snapshot: ${snapshot.drivers} drivers on the map ${tookMs} ms after opening the page (${snapshot.ms} ms after the request)`);
    assert.deepEqual(page.consoleLines.filter((l) => /^(error|pageerror)/.test(l)), []);
    await page.close();
    break;
  }
});

test("the demo page shows orders appearing and drivers moving, with the stream's status", { timeout: 2 * TIMEOUT }, async () => {
  const page = await openPage(browser, `http://127.0.0.1:${port}/`);
  try {
    await page.locator('#conn[data-state="live"]').waitFor({ timeout: TIMEOUT });
    await page.waitForFunction(() => document.querySelectorAll("#orders .order").length >= 3, null, { timeout: TIMEOUT });
    await page.waitForFunction(() => document.querySelectorAll("#drivers-layer .drv").length >= 2, null, { timeout: TIMEOUT });
    // A driver moves: its position on the map changes.
    const before = await page.$$eval("#drivers-layer .drv", (gs) => gs.map((g) => g.style.transform));
    await page.waitForFunction(
      (old) => [...document.querySelectorAll("#drivers-layer .drv")].some((g, i) => old[i] !== undefined && g.style.transform !== old[i]),
      before,
      { timeout: TIMEOUT },
    );
    await page.waitForFunction(() => Number(document.getElementById("st-rate").textContent) > 0, null, { timeout: TIMEOUT });
  } catch (error) {
    throw new Error(`${error.message}\nconsole:\n${page.consoleLines.join("\n")}\nfjord dev:\n${dev.tail(20)}`);
  }
  assert.equal(await page.locator("#conn-text").textContent(), "Live");
  const lastId = await page.locator("#st-id").textContent();
  assert.match(lastId, /^\d+-\d+(_\d+-\d+)?$/, `last event id ${lastId}`);
  assert.equal(await page.evaluate(() => window.fjordDemo.lastEventId !== undefined), true);
  assert.match(await page.locator("#orders .order .title").first().textContent(), /\S/);
  assert.deepEqual(page.consoleLines.filter((l) => l.startsWith("pageerror")), []);
  if (process.env.FJORD_E2E_SCREENSHOTS) {
    await page.screenshot({ path: join(process.env.FJORD_E2E_SCREENSHOTS, "demo.png"), fullPage: true });
  }
  await page.close();
});

test("Drop connection: the client resumes from its last id and no record is missed or repeated", { timeout: TIMEOUT }, async () => {
  const page = await openDemo(`http://127.0.0.1:${port}/`);
  let drop;
  try {
    await page.locator('#conn[data-state="live"]').waitFor({ timeout: TIMEOUT / 2 });
    await page.waitForFunction(() => window.fjordDemo.arrivals.length > 50, null, { timeout: TIMEOUT / 2 });
    await page.click("#drop");
    await page.locator('#conn[data-state="reconnecting"]').waitFor({ timeout: 5_000 });
    drop = await page.waitForFunction(() => window.fjordDemo.drops[0], null, { timeout: TIMEOUT / 2 }).then((h) => h.jsonValue());
  } catch (error) {
    throw explain(error, page);
  }
  assert.equal(drop.missed, 0);
  assert.equal(drop.repeated, 0);
  assert.ok(drop.reopenedAt - drop.at >= 500, `the connection was really down (${drop.reopenedAt - drop.at} ms)`);
  assert.ok(drop.replayed > 0, "records made while the page was disconnected were replayed");
  // Checked here too, from what the page received: per partition, offsets follow one another.
  const arrivals = await page.evaluate(() => window.fjordDemo.arrivals);
  const last = new Map();
  let during = 0;
  for (const [topic, partition, offset, timestamp] of arrivals) {
    const key = `${topic}/${partition}`;
    if (last.has(key)) assert.equal(offset, last.get(key) + 1, `${key}: offset ${offset} after ${last.get(key)}`);
    last.set(key, offset);
    if (timestamp > drop.at && timestamp < drop.reopenedAt) during++;
  }
  assert.ok(during > 0, "some records were made while the page was disconnected");
  assert.match(await page.locator("#drop-info").textContent(), /replayed; 0 missed, 0 repeated/);
  console.log(`drop: down ${drop.reopenedAt - drop.at} ms, ${drop.replayed} records replayed, ${arrivals.length} records checked in order`);
  await page.close();
});

test("the key filter follows one driver on a connection of its own, and the panel counts connections", { timeout: TIMEOUT }, async () => {
  const page = await openDemo(`http://127.0.0.1:${port}/`);
  try {
    await page.locator('#filter-key option[value="driver-3"]').waitFor({ state: "attached", timeout: TIMEOUT / 2 });
    await page.selectOption("#filter-key", "driver-3");
    await page.waitForFunction(() => window.fjordDemo.filter.count >= 3, null, { timeout: TIMEOUT / 2 });
    await page.waitForFunction(() => Number(document.getElementById("conns-open").textContent) >= 2, null, { timeout: 10_000 });
  } catch (error) {
    throw explain(error, page);
  }
  const filter = await page.evaluate(() => window.fjordDemo.filter);
  assert.equal(filter.others, 0);
  assert.equal(filter.status, "open");
  assert.match(await page.locator("#filter-info").textContent(), /\/v1\/streams\/drivers\?key=driver-3: \d+ records, all driver-3/);
  assert.match(await page.locator("#conns-list").textContent(), /key filter: driver-3 open/);
  assert.equal(await page.locator("#drivers-layer .drv.followed").count(), 1);
  await page.close();
});

test("the value filter: only orders that pass it, with three fields, the bytes saved, and a bad filter's message", { timeout: 2 * TIMEOUT }, async () => {
  const page = await openDemo(`http://127.0.0.1:${port}/`);
  const FILTER = "value.total_cents >= 3000";
  const applied = () =>
    page.waitForFunction(
      () => {
        const f = window.fjordDemo.valueFilter;
        // Since Apply, orders that pass and orders that do not: which ones come is random.
        const b = f.bytes;
        return f.count >= 3 && b && b.orders >= 3 && b.matched >= 1 && b.matched < b.orders && b.savedPerSecond > 0;
      },
      null,
      { timeout: TIMEOUT / 2 },
    );
  try {
    await page.locator("#hood-value").waitFor({ timeout: TIMEOUT / 2 });
    assert.equal(await page.inputValue("#value-filter"), FILTER);
    assert.equal(await page.evaluate(() => window.fjordDemo.valueFilter.status), null, "not applied at load");
    // The main connection has its history, so that "since Apply" means new orders.
    await page.waitForFunction(() => document.querySelectorAll("#orders .order").length >= 10, null, { timeout: TIMEOUT / 2 });
    await page.click("#value-apply");
    await applied();
    await page.waitForFunction(() => Number(document.getElementById("value-evals").textContent.replace(/\D/g, "")) > 0, null, {
      timeout: 10_000,
    });
  } catch (error) {
    throw explain(error, page);
  }
  const filter = await page.evaluate(() => window.fjordDemo.valueFilter);
  assert.equal(filter.filter, FILTER);
  assert.equal(filter.status, "open");
  assert.equal(filter.error, null);
  assert.equal(filter.others, 0);
  assert.ok(filter.values.length >= 3);
  for (const value of filter.values) {
    assert.deepEqual(Object.keys(value).sort(), ["order_id", "status", "total_cents"], JSON.stringify(value));
    assert.ok(value.total_cents >= 3000, JSON.stringify(value));
  }
  // The main connection got orders that the filter held back.
  const totals = await page.$$eval("#orders .order .total", (ts) => ts.map((t) => Number(t.textContent)).filter((t) => t > 0));
  assert.ok(totals.some((t) => t < 30), `orders of the main connection: ${totals.join(" ")}`);
  const { bytes } = filter;
  assert.ok(bytes.savedPercent > 0 && bytes.savedPercent < 100, JSON.stringify(bytes));
  assert.ok(bytes.matchedBytes < bytes.ordersBytes, JSON.stringify(bytes));
  const info = await page.locator("#value-info").textContent();
  assert.match(info, /^Received \d+ records?\. Since Apply: \d+ of \d+ orders · \d+(\.\d)? (KB|B)\/s saved \(\d+ %\)$/);
  assert.equal(await page.locator("#value-log li").count() > 0, true);
  assert.match(await page.locator("#conns-list").textContent(), /value filter: value\.total_cents >= 3000 open/);
  console.log(`value filter: ${info}`);

  // A bad filter (Enter applies it): the server's 400 shows in the card, nothing is thrown.
  await page.fill("#value-filter", "value.total_cents >=");
  await page.press("#value-filter", "Enter");
  try {
    await page.locator("#value-error").waitFor({ state: "visible", timeout: TIMEOUT / 2 });
  } catch (error) {
    throw explain(error, page);
  }
  const refused = await page.evaluate(() => window.fjordDemo.valueFilter);
  assert.equal(refused.error.code, "bad_filter");
  assert.equal(refused.error.status, 400);
  assert.equal(refused.status, "closed");
  assert.equal(refused.count, 0);
  const shown = await page.locator("#hood-value").textContent();
  assert.match(shown, /bad_filter/);
  assert.match(shown, /column \d+/);
  assert.match(await page.locator("#conns-list").textContent(), /value filter: value\.total_cents >= refused \(bad_filter\)/);

  // The next Apply tries again; an empty filter closes the connection.
  await page.fill("#value-filter", FILTER);
  await page.click("#value-apply");
  try {
    await applied();
  } catch (error) {
    throw explain(error, page);
  }
  assert.equal(await page.locator("#value-error").isHidden(), true);
  await page.fill("#value-filter", "");
  await page.click("#value-apply");
  assert.equal(await page.evaluate(() => window.fjordDemo.valueFilter.status), null);
  assert.doesNotMatch(await page.locator("#conns-list").textContent(), /value filter/);

  // Nothing asked for that the server lacks: the only refusal is the bad filter's 400.
  const refusals = page.failedRequests.filter((r) => !/^400 http:\/\/127\.0\.0\.1:\d+\/v1\/streams\/orders\?filter=value\.total_cents/.test(r));
  assert.deepEqual(refusals, []);
  assert.equal(page.failedRequests.length, 1, page.failedRequests.join("\n"));
  assert.deepEqual(
    page.consoleLines.filter((l) => /^(error|pageerror)/.test(l) && !/status of 400/.test(l)),
    [],
  );
  await page.close();
});

test("driver labels never overlap", { timeout: TIMEOUT }, async () => {
  const page = await openDemo(`http://127.0.0.1:${port}/`);
  await page.emulateMedia({ reducedMotion: "reduce" }); // no transitions: the boxes are final
  try {
    await page.waitForFunction(() => document.querySelectorAll("#drivers-layer .drv").length === 8, null, { timeout: TIMEOUT / 2 });
  } catch (error) {
    throw explain(error, page);
  }
  let shown = 0;
  for (let sample = 0; sample < 8; sample++) {
    await page.waitForTimeout(400);
    const labels = await page.$$eval("#drivers-layer .drv", (gs) =>
      gs.map((g) =>
        [...g.querySelectorAll(".lbl, .sub")]
          .filter((t) => !t.hasAttribute("hidden") && t.textContent !== "")
          .map((t) => {
            const r = t.getBoundingClientRect();
            return { text: t.textContent, box: [r.left, r.top, r.right, r.bottom] };
          }),
      ),
    );
    shown = Math.max(shown, labels.filter((l) => l.length > 0).length);
    for (let a = 0; a < labels.length; a++) {
      for (let b = a + 1; b < labels.length; b++) {
        for (const x of labels[a]) {
          for (const y of labels[b]) {
            const overlap = x.box[0] < y.box[2] && y.box[0] < x.box[2] && x.box[1] < y.box[3] && y.box[1] < x.box[3];
            assert.ok(!overlap, `labels overlap: ${x.text} ${x.box.map(Math.round)} and ${y.text} ${y.box.map(Math.round)}`);
          }
        }
      }
    }
  }
  assert.ok(shown >= 5, `only ${shown} of 8 drivers have a label`);
  await page.close();
});

test("on a phone the live data comes first: the map, then the orders", { timeout: TIMEOUT }, async () => {
  const viewport = { width: 390, height: 844 };
  const page = await openDemo(`http://127.0.0.1:${port}/`, viewport);
  try {
    await page.waitForFunction(() => document.querySelectorAll("#orders .order").length >= 5, null, { timeout: TIMEOUT / 2 });
  } catch (error) {
    throw explain(error, page);
  }
  const top = (selector) => page.locator(selector).evaluate((e) => e.getBoundingClientRect().top);
  const map = await top("#map");
  const orders = await top("#orders");
  assert.ok(map < viewport.height / 3, `the map starts at ${map} px`);
  assert.ok(orders < viewport.height, `the orders start at ${orders} px, below the first screen`);
  assert.ok(map < orders && orders < (await top(".hood")) && orders < (await top(".stats")), "map, orders, then the panels");
  assert.equal(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), true, "no sideways scrolling");
  if (process.env.FJORD_E2E_SCREENSHOTS) {
    await page.screenshot({ path: join(process.env.FJORD_E2E_SCREENSHOTS, "demo-phone.png"), fullPage: true });
  }
  await page.close();
});

test("fjord dev --auth: the banner's page address streams with its token; without one the page says why", { timeout: 2 * TIMEOUT }, async () => {
  const authPort = await freePort();
  const authDev = new Proc("fjord-dev-auth", bin("fjord"), ["dev", "--auth", "--port", String(authPort)], dir);
  try {
    const address = await until(
      "the banner's demo page address",
      () => {
        if (!authDev.running) throw new Error(`fjord dev --auth exited:\n${authDev.tail()}`);
        return /^ {2}Demo page +(\S+)$/m.exec(authDev.tail(60))?.[1];
      },
      TIMEOUT,
    );
    assert.match(address, new RegExp(`^http://127\\.0\\.0\\.1:${authPort}/#token=ey`));
    const page = await openDemo(address);
    try {
      await page.locator('#conn[data-state="live"]').waitFor({ timeout: TIMEOUT / 2 });
      await page.waitForFunction(() => document.querySelectorAll("#orders .order").length >= 5, null, { timeout: TIMEOUT / 2 });
    } catch (error) {
      throw explain(error, page);
    }
    assert.equal(new URL(page.url()).hash, "", "the token left the address bar");
    assert.equal(await page.locator("#auth-needed").isHidden(), true);
    await page.close();

    const bare = await openDemo(`http://127.0.0.1:${authPort}/`);
    await bare.locator("#auth-needed").waitFor({ state: "visible", timeout: TIMEOUT / 2 });
    assert.equal(await bare.locator("#orders .order").count(), 0);
    await bare.close();
  } finally {
    await authDev.stop();
  }
});

test("the page snippet of docs/clients.md, served from another origin, shows live orders", { timeout: TIMEOUT }, async () => {
  const page = await readFile(join(repoDir, "docs", "clients.md"), "utf8");
  const snippet = /```html\n([\s\S]*?)```/.exec(page)?.[1];
  assert.ok(snippet, "an html snippet in docs/clients.md");
  const html = snippet.replaceAll("http://localhost:8080", `http://127.0.0.1:${port}`);
  const statics = createServer((_, res) => res.writeHead(200, { "content-type": "text/html" }).end(html));
  await new Promise((done) => statics.listen(0, "127.0.0.1", done));
  try {
    const page = await openPage(browser, `http://127.0.0.1:${statics.address().port}/`);
    try {
      await page.waitForFunction(() => document.querySelectorAll("#orders li").length >= 3, null, { timeout: TIMEOUT / 2 });
    } catch (error) {
      throw new Error(`${error.message}\nstatus: ${await page.locator("#status").textContent()}\nconsole:\n${page.consoleLines.join("\n")}`);
    }
    assert.equal(await page.locator("#status").textContent(), "open");
    assert.match(await page.locator("#orders li").first().textContent(), /^order-\S+: \{.*"status"/);
    await page.close();
  } finally {
    statics.closeAllConnections();
    await new Promise((done) => statics.close(done));
  }
});
