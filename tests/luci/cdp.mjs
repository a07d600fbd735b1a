// Drives headless Chromium over the DevTools protocol for tests/luci.rs, on
// the pattern of ../shared/openwrt-luci/cdp-shot.mjs (Node >= 20.10 with
// --experimental-websocket, no npm packages).
//
//   node --experimental-websocket cdp.mjs DEVTOOLS_PORT
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
// the test's failure says what the page showed instead.
import { writeFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

const [port] = process.argv.slice(2);
const sleep = ms => new Promise(r => setTimeout(r, ms));

let target;
for (let i = 0; i < 150 && !target; i++) {
	try {
		target = await (await fetch(`http://127.0.0.1:${port}/json/new?about:blank`, { method: 'PUT' })).json();
	} catch (e) { await sleep(200); }
}
if (!target) {
	console.log(JSON.stringify({ ok: false, error: 'no DevTools endpoint on port ' + port }));
	process.exit(1);
}

const ws = new WebSocket(target.webSocketDebuggerUrl);
await new Promise((res, rej) => { ws.onopen = res; ws.onerror = rej; });
let seq = 0;
const pending = new Map();
let problems = [];
ws.onmessage = m => {
	const msg = JSON.parse(m.data);
	if (msg.id && pending.has(msg.id)) { pending.get(msg.id)(msg); pending.delete(msg.id); return; }
	if (msg.method === 'Runtime.exceptionThrown')
		problems.push('exception: ' + (msg.params.exceptionDetails.exception?.description || msg.params.exceptionDetails.text));
	if (msg.method === 'Runtime.consoleAPICalled' && msg.params.type === 'error')
		problems.push('console.error: ' + msg.params.args.map(a => a.value ?? a.description).join(' '));
	if (msg.method === 'Log.entryAdded' && msg.params.entry.level === 'error')
		problems.push('log: ' + msg.params.entry.text + ' ' + (msg.params.entry.url || ''));
};
const send = (method, params = {}) => new Promise(res => {
	const id = ++seq; pending.set(id, res); ws.send(JSON.stringify({ id, method, params }));
});
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
		await send('Page.navigate', { url: `${base}/cgi-bin/luci/` });
		await waitFor(`!!document.querySelector('input[name=luci_password]')`, 30000);
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
ws.close();
process.exit(0);
