// Drives headless Chromium over the DevTools protocol for tests/luci.rs, on
// the pattern of ../shared/openwrt-luci/cdp-shot.mjs, but over
// --remote-debugging-pipe (fds 3 and 4, NUL-terminated JSON) instead of a
// WebSocket: no port to share, and any Node >= 18 with no npm packages.
//
//   node cdp.mjs COMMAND...     COMMAND starts Chromium (e.g. nsenter ... chromium ARGS);
//                               --remote-debugging-pipe is appended
//
// The test sends one JSON command per line on stdin and reads one JSON
// answer per line on stdout: {"ok":true,"value":...} or
// {"ok":false,"error":"..."}. Commands:
//   {"op":"login","base":URL,"user":U,"password":P}   fresh session, login form
//   {"op":"goto","url":URL,"ready":EXPR,"ms":N}       navigate, wait for EXPR
//   {"op":"wait","expr":EXPR,"ms":N}                  poll EXPR until truthy
//   {"op":"eval","expr":EXPR}                         value of EXPR (awaited)
//   {"op":"type","selector":S,"text":T}               set an input's value as typing would
//   {"op":"click","selector":S}                       click the first match
//   {"op":"shot","path":FILE}                         PNG of the whole page
//   {"op":"problems"}                                 exceptions and console errors so far
// A wait that times out answers ok:false with the page's visible text, so
// the test's failure says what the page showed instead. Chromium is closed
// when stdin ends.
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

const sleep = ms => new Promise(r => setTimeout(r, ms));
const argv = process.argv.slice(2);
const chromium = spawn(argv[0], [...argv.slice(1), '--remote-debugging-pipe'],
	{ stdio: ['ignore', 'ignore', 'inherit', 'pipe', 'pipe'] });
const toChromium = chromium.stdio[3], fromChromium = chromium.stdio[4];
for (const pipe of [toChromium, fromChromium])
	pipe.on('error', e => {
		console.log(JSON.stringify({ ok: false, error: 'pipe to chromium: ' + e.message }));
		process.exit(1);
	});
chromium.on('exit', code => {
	console.log(JSON.stringify({ ok: false, error: `chromium exited (${code})` }));
	process.exit(1);
});

let seq = 0;
let sessionId;
const pending = new Map();
let problems = [];
const onMessage = msg => {
	if (msg.id && pending.has(msg.id)) { pending.get(msg.id)(msg); pending.delete(msg.id); return; }
	if (msg.method === 'Runtime.exceptionThrown')
		problems.push('exception: ' + (msg.params.exceptionDetails.exception?.description || msg.params.exceptionDetails.text));
	if (msg.method === 'Runtime.consoleAPICalled' && msg.params.type === 'error')
		problems.push('console.error: ' + msg.params.args.map(a => a.value ?? a.description).join(' '));
	if (msg.method === 'Log.entryAdded' && msg.params.entry.level === 'error')
		problems.push('log: ' + msg.params.entry.text + ' ' + (msg.params.entry.url || ''));
};
let buffered = Buffer.alloc(0);
fromChromium.on('data', chunk => {
	buffered = Buffer.concat([buffered, chunk]);
	for (let end; (end = buffered.indexOf(0)) >= 0; buffered = buffered.subarray(end + 1))
		onMessage(JSON.parse(buffered.subarray(0, end).toString('utf8')));
});
// Commands go to the page's session once attached (flat mode), before that
// to the browser.
const send = (method, params = {}, session = sessionId) => new Promise(res => {
	const id = ++seq; pending.set(id, res);
	toChromium.write(JSON.stringify(session ? { id, method, params, sessionId: session } : { id, method, params }) + '\0');
});

const created = await send('Target.createTarget', { url: 'about:blank' });
if (!created.result) {
	console.log(JSON.stringify({ ok: false, error: 'no page: ' + JSON.stringify(created.error) }));
	process.exit(1);
}
sessionId = (await send('Target.attachToTarget', { targetId: created.result.targetId, flatten: true })).result.sessionId;

const evaluate = async expr => {
	const r = await send('Runtime.evaluate', { expression: expr, returnByValue: true, awaitPromise: true });
	if (r.result?.exceptionDetails)
		throw new Error('page threw: ' + (r.result.exceptionDetails.exception?.description || r.result.exceptionDetails.text));
	return r.result?.result?.value;
};
const pageText = async () => (await evaluate(`document.body ? document.body.innerText : ''`) || '').replace(/\s+/g, ' ').slice(0, 1500);
const waitFor = async (expr, ms) => {
	const deadline = Date.now() + (ms || 20000);
	let last;
	while (Date.now() < deadline) {
		try { last = await evaluate(expr); } catch (e) { last = undefined; }
		if (last) return last;
		await sleep(200);
	}
	throw new Error(`timed out after ${ms || 20000} ms waiting for ${expr}; page at ${await evaluate('location.href')} shows: ${await pageText()}`);
};

await send('Page.enable'); await send('Runtime.enable'); await send('Log.enable'); await send('Network.enable');
await send('Emulation.setDeviceMetricsOverride', { width: 1280, height: 900, deviceScaleFactor: 1, mobile: false });

const ops = {
	async login({ base, user, password }) {
		// A new login must not ride on the previous user's session cookie.
		await send('Network.clearBrowserCookies');
		// uhttpd may still be starting: navigate again until the form shows.
		const deadline = Date.now() + 30000;
		for (;;) {
			await send('Page.navigate', { url: `${base}/cgi-bin/luci/` });
			try { await waitFor(`!!document.querySelector('input[name=luci_password]')`, 3000); break; }
			catch (e) { if (Date.now() > deadline) throw e; }
		}
		await sleep(1000);   // the login form fades in; a click before that is lost
		await evaluate(`(() => {
			document.querySelector('input[name=luci_username]').value = ${JSON.stringify(user)};
			document.querySelector('input[name=luci_password]').value = ${JSON.stringify(password)};
			const b = document.querySelector('button.btn.cbi-button-positive, .cbi-page-actions button, button[type=submit], input[type=submit]');
			if (b) b.click(); else document.querySelector('form').submit();
			return true;
		})()`);
		await waitFor(`!document.querySelector('input[name=luci_password]') && !!document.querySelector('#view') && [...document.querySelectorAll('a')].some(a => a.textContent.trim() == 'Log out')`, 30000);
		return await evaluate('location.href');
	},
	async goto({ url, ready, ms }) {
		await send('Page.navigate', { url });
		await sleep(300);
		return await waitFor(ready || `document.readyState == 'complete'`, ms || 30000);
	},
	async wait({ expr, ms }) { return await waitFor(expr, ms); },
	async eval({ expr }) { return await evaluate(expr); },
	async type({ selector, text }) {
		return await evaluate(`(() => { const i = document.querySelector(${JSON.stringify(selector)});
			if (!i) throw new Error('no element ' + ${JSON.stringify(selector)});
			i.focus(); i.value = ${JSON.stringify(text)};
			i.dispatchEvent(new Event('input', { bubbles: true })); i.dispatchEvent(new Event('change', { bubbles: true }));
			i.dispatchEvent(new Event('blur', { bubbles: true }));
			return true; })()`);
	},
	async click({ selector }) {
		return await evaluate(`(() => { const e = document.querySelector(${JSON.stringify(selector)});
			if (!e) throw new Error('no element ' + ${JSON.stringify(selector)});
			e.click(); return true; })()`);
	},
	async shot({ path }) {
		await sleep(300);   // let the last poll paint
		const r = await send('Page.captureScreenshot', { format: 'png', captureBeyondViewport: true });
		writeFileSync(path, Buffer.from(r.result.data, 'base64'));
		return path;
	},
	async problems() { const p = problems; problems = []; return p; }
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
	if (!line.trim()) continue;
	let answer;
	try {
		const cmd = JSON.parse(line);
		if (!ops[cmd.op]) throw new Error('unknown op ' + cmd.op);
		answer = { ok: true, value: (await ops[cmd.op](cmd)) ?? null };
	} catch (e) {
		answer = { ok: false, error: String(e.message || e) };
	}
	console.log(JSON.stringify(answer));
}
chromium.removeAllListeners('exit');
await Promise.race([send('Browser.close', {}, null), sleep(5000)]);
chromium.kill();
process.exit(0);
