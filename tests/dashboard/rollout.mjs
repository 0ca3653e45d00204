// Drives the hub's dashboard in headless Chromium, as an operator would.
//
//   node rollout.mjs watch URL TOKEN OUT_DIR TOTAL   the pages read without JavaScript; then,
//       signed in, the rollouts page shows fewer than TOTAL active and, without a reload,
//       all TOTAL active as the next wave opens
//   node rollout.mjs halt URL TOKEN OUT_DIR RELEASE HELD   press "Halt" on RELEASE and see,
//       without a reload, it marked halted and HELD devices in the "held" state; then a
//       held device's page: its history from the git log, its last signed report
//
//   node rollout.mjs crossport URL TOKEN OUT_DIR ATTACKER RELEASE   signed in, open ATTACKER (a
//       page on another port of the same host that submits a "halt RELEASE" form to the
//       dashboard as it loads) and print the status the dashboard answered the form with
//
// Screenshots go to OUT_DIR. Exits non-zero, saying what it did not see, on failure.
import { chromium } from 'playwright-core';

const [mode, url, token, out, ...rest] = process.argv.slice(2);
const LIVE_TIMEOUT = 90_000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});

async function signedIn() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  await page.goto(`${url}/login`);
  await page.fill('input[name=token]', token);
  await Promise.all([page.waitForURL(`${url}/rollouts`), page.click('button[type=submit]')]);
  // Marks this document: a reload would lose it.
  await page.evaluate(() => { window.__notReloaded = true; });
  return page;
}

async function stillSamePage(page) {
  if (!(await page.evaluate(() => window.__notReloaded === true))) {
    throw new Error('the page was reloaded; updates must arrive live');
  }
}

const activeCount = (page) =>
  page.evaluate(() => Number(document.querySelector('.active-count')?.textContent ?? -1));

async function watch(total) {
  // Reading works without JavaScript: server-rendered tables.
  const plain = await browser.newContext({ javaScriptEnabled: false });
  const p = await plain.newPage();
  for (const path of ['/', '/releases', '/rollouts']) {
    await p.goto(url + path);
    if ((await p.locator('table').count()) === 0) throw new Error(`${path} has no table without JavaScript`);
  }
  await p.goto(url + '/');
  await p.screenshot({ path: `${out}/devices-nojs.png`, fullPage: true });
  await plain.close();

  const page = await signedIn();
  const first = await activeCount(page);
  if (!(first >= 0 && first < total)) throw new Error(`expected fewer than ${total} active at first, saw ${first}`);
  await page.screenshot({ path: `${out}/rollout-first-wave.png`, fullPage: true });
  await page.waitForFunction(
    (n) => Number(document.querySelector('.active-count')?.textContent) === n,
    total,
    { timeout: LIVE_TIMEOUT },
  );
  await stillSamePage(page);
  await page.screenshot({ path: `${out}/rollout-done.png`, fullPage: true });
  console.log(`rollout seen live: ${first} then ${total} active`);
}

async function halt(release, held) {
  const page = await signedIn();
  const section = page.locator(`section.rollout[data-release="${release}"]`);
  await section.waitFor({ timeout: LIVE_TIMEOUT });
  await Promise.all([page.waitForURL(`${url}/rollouts`), section.locator('button', { hasText: 'Halt' }).click()]);
  await page.evaluate(() => { window.__notReloaded = true; });
  await page.locator('.hold.halted', { hasText: 'HALTED' }).waitFor({ timeout: LIVE_TIMEOUT });
  await page.screenshot({ path: `${out}/rollout-halted.png`, fullPage: true });
  // The devices page, live: the devices that had not installed it stop, held.
  await page.goto(`${url}/`);
  await page.evaluate(() => { window.__notReloaded = true; });
  await page.waitForFunction(
    (n) => document.querySelectorAll('tr[data-state="held"]').length === n,
    held,
    { timeout: LIVE_TIMEOUT },
  );
  await stillSamePage(page);
  await page.screenshot({ path: `${out}/devices-held.png`, fullPage: true });
  // A held device's own page.
  await page.locator('tr[data-state="held"] a').first().click();
  await page.locator('h2', { hasText: 'History' }).waitFor();
  const history = await page.locator('table tbody tr').allTextContents();
  if (!history.some((row) => row.includes('device-held'))) {
    throw new Error(`the device's history has no device-held event: ${history.join(' | ')}`);
  }
  const report = await page.locator('pre.report').first().textContent();
  if (!report.includes('Held')) throw new Error(`the last signed report is not the held one: ${report}`);
  await page.screenshot({ path: `${out}/device-page.png`, fullPage: true });
  console.log(`halted release ${release}; ${held} device(s) held`);
}

async function crossport(attacker, release) {
  const page = await signedIn();
  const answered = page.waitForResponse((r) => r.url().endsWith(`/${release}/halt`), { timeout: 30_000 });
  await page.goto(attacker);
  const r = await answered;
  await page.screenshot({ path: `${out}/cross-port-refused.png`, fullPage: true });
  console.log(`cross-port form answered ${r.status()}`);
}

try {
  if (mode === 'crossport') await crossport(rest[0], Number(rest[1]));
  else if (mode === 'watch') await watch(Number(rest[0]));
  else if (mode === 'halt') await halt(Number(rest[0]), Number(rest[1]));
  else throw new Error(`unknown mode ${mode}`);
} catch (e) {
  console.error(`dashboard: ${e.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
