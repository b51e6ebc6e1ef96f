// End to end: the guest's network (--net, --allow-host, -p) on real QEMU user-mode networking, with
// the real kernel configuring the NIC and the real allowlist proxy. Every server is one this file
// starts on 127.0.0.1; the guest reaches the host's loopback as 10.0.2.2. No traffic goes anywhere else.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, get, type Server } from 'node:http';
import { createServer as createTcpServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { assertNoVmLeft, collect, isolatedEnv, mvmctl, repoRoot, startMvmctl, vmProcessesMentioning, waitForOutput } from './helpers.js';

const isolated = isolatedEnv();
const { stateDir } = isolated;
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-net-'));
// Both names lead to the same loopback server: only the allowlist tells them apart.
const hostsFile = join(work, 'hosts');
writeFileSync(hostsFile, '127.0.0.1 allowed.test denied.test\n');
const env: NodeJS.ProcessEnv = { ...isolated.env, MVM_NET_HOSTS: hostsFile };

let server: Server;
let port: number;
/** Request paths the host's server has answered. */
const served: string[] = [];

before(async () => {
  const built = await mvmctl(['image', 'build'], env);
  assert.equal(built.code, 0, built.stderr);
  server = createServer((req, res) => {
    served.push(req.url ?? '');
    res.end(`host-page ${req.headers.host} ${req.url}\n`);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  port = (server.address() as AddressInfo).port;
});

after(() => {
  server?.close();
  isolated.cleanup();
  rmSync(work, { recursive: true, force: true });
});

async function freePort(): Promise<number> {
  const probe = createTcpServer().listen(0, '127.0.0.1');
  await once(probe, 'listening');
  const { port: free } = probe.address() as AddressInfo;
  await new Promise((resolve) => probe.close(resolve));
  return free;
}

function fetchText(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    get(url, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve(body));
    }).on('error', reject);
  });
}

describe('exec --net, --allow-host, -p', () => {
  test('by default the guest has no NIC at all', async () => {
    const result = await mvmctl(['exec', '-v', '--', 'ls', '/sys/class/net'], env);
    assert.equal(result.code, 0, result.stderr.toString());
    assert.equal(result.stdout.toString(), 'lo\n');
    await assertNoVmLeft(stateDir);
  });

  test('--net user: the guest has an address, a route and a resolver, and fetches from the host', async () => {
    const script = `cat /etc/resolv.conf; ip route; wget -q -O - http://10.0.2.2:${port}/open`;
    const result = await mvmctl(['exec', '--net', 'user', '-v', '--', 'sh', '-c', script], env);
    const out = result.stdout.toString();
    assert.equal(result.code, 0, result.stderr.toString());
    assert.match(out, /^nameserver 10\.0\.2\.3$/m);
    assert.match(out, /^default via 10\.0\.2\.2 dev eth0/m);
    assert.match(out, new RegExp(`host-page 10\\.0\\.2\\.2:${port} /open`));
    assert.match(result.stderr.toString(), /\[net\] user \(outbound through the host\)/);
    await assertNoVmLeft(stateDir);
  });

  test('--allow-host: the named host is fetched through the proxy, another name gets a 403 that says why, raw TCP goes nowhere', async () => {
    const before = served.length;
    const script = [
      `wget -q -O - http://allowed.test:${port}/allowed; echo "allowed rc=$?"`,
      // Straight to the proxy, to see the refusal's own text.
      `printf 'GET http://denied.test:${port}/denied HTTP/1.0\\r\\n\\r\\n' | nc 10.0.2.100 3128`,
      // The host's server, not through the proxy: restrict=on drops it.
      `printf 'GET /raw HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.0.2.2 ${port}; echo "raw rc=$?"`,
      'echo "proxy=$HTTP_PROXY"',
    ].join('; ');
    const result = await mvmctl(['exec', '--allow-host', `allowed.test:${port}`, '-v', '--', 'sh', '-c', script], env);
    const out = result.stdout.toString();
    assert.equal(result.code, 0, result.stderr.toString());
    assert.match(out, new RegExp(`host-page allowed\\.test:${port} /allowed\\nallowed rc=0`));
    assert.match(out, /HTTP\/1\.1 403 Forbidden/);
    assert.match(out, new RegExp(`denied\\.test:${port} is not allowed: this VM may reach only allowed\\.test:${port} \\(--allow-host\\)`));
    assert.match(out, /raw rc=1/);
    assert.match(out, /proxy=http:\/\/10\.0\.2\.100:3128/);
    assert.deepEqual(served.slice(before), ['/allowed'], 'only the allowed request reached the host');
    assert.match(result.stderr.toString(), new RegExp(`\\[net\\] refused GET denied\\.test:${port}: not allowed by --allow-host`));
    await assertNoVmLeft(stateDir);
  });

  test('-p forwards a loopback host port to the guest', async () => {
    const hostPort = await freePort();
    const script = 'mkdir /www && echo guest-page > /www/index.html && httpd -p 8000 -h /www && echo ready && sleep 100';
    const child = startMvmctl(['exec', '-p', `${hostPort}:8000`, '--', 'sh', '-c', script], env);
    const done = collect(child);
    await waitForOutput(child, 'ready\n');
    assert.equal(await fetchText(`http://127.0.0.1:${hostPort}/index.html`), 'guest-page\n');
    child.kill('SIGTERM');
    assert.equal((await done).code, 143);
    await assertNoVmLeft(stateDir);
  });

  test('-p on a host port that is taken: one line naming it, exit 125', async () => {
    const taken = createTcpServer().listen(0, '127.0.0.1');
    await once(taken, 'listening');
    const { port: takenPort } = taken.address() as AddressInfo;
    try {
      const result = await mvmctl(['exec', '-p', `${takenPort}:80`, '--', 'true'], env);
      assert.equal(result.code, 125);
      assert.match(result.stderr.toString(), new RegExp(`-p: cannot listen on 127\\.0\\.0\\.1:${takenPort}`));
    } finally {
      taken.close();
    }
    await assertNoVmLeft(stateDir);
  });

  test('kill -9 of mvmctl with a proxy connection open leaves no QEMU and no proxy helper', async () => {
    // `sleep | nc` holds a connection to the proxy open, so QEMU has a helper running for it.
    const script = `(sleep 100 | nc 10.0.2.100 3128 &) ; sleep 1; echo ready; sleep 100`;
    const child = startMvmctl(['exec', '--allow-host', 'allowed.test', '--', 'sh', '-c', script], env);
    const done = collect(child);
    await waitForOutput(child, 'ready\n');
    const helpers = vmProcessesMentioning(stateDir).filter((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('socat'));
    assert.ok(helpers.length > 0, 'QEMU runs a socat for the open proxy connection');
    child.kill('SIGKILL');
    await done;
    for (let i = 0; i < 50 && vmProcessesMentioning(stateDir).length > 0; i++) await sleep(100);
    assert.deepEqual(vmProcessesMentioning(stateDir), [], 'no QEMU or socat may outlive mvmctl');
    // The next command reaps the state the killed run left.
    assert.equal((await mvmctl(['ls'], env)).code, 0);
    await assertNoVmLeft(stateDir);
  });
});

describe('the network under the Firecracker backend (its test double)', () => {
  const fcEnv: NodeJS.ProcessEnv = {
    ...env,
    MVM_BACKEND: 'firecracker',
    MVM_FIRECRACKER: join(repoRoot, 'test', 'firecracker-double', 'firecracker'),
    // The double stands for a host where KVM works: the product's KVM checks would rule this one out.
    MVM_KVM_PRECHECK: '0',
  };

  test('--net user: PUT /network-interfaces on the named TAP (the double puts QEMU user networking behind it)', async () => {
    // The backend only checks that the device exists; the double checks the API call and never opens it.
    const result = await mvmctl(['exec', '--net', 'user', '--', 'wget', '-q', '-O', '-', `http://10.0.2.2:${port}/firecracker`], { ...fcEnv, MVM_FIRECRACKER_TAP: 'lo' });
    assert.equal(result.code, 0, result.stderr.toString());
    assert.match(result.stdout.toString(), new RegExp(`host-page 10\\.0\\.2\\.2:${port} /firecracker`));
    await assertNoVmLeft(stateDir);
  });

  test('what Firecracker cannot give is one line naming the fix, exit 125, before any VM starts', async () => {
    const noTap = await mvmctl(['exec', '--net', 'user', '--', 'true'], fcEnv);
    assert.equal(noTap.code, 125);
    assert.match(noTap.stderr.toString(), /^mvmctl: --net user with Firecracker needs a TAP device: .*set MVM_FIRECRACKER_TAP=mvmtap0; or use --backend qemu\n$/);
    const allowlist = await mvmctl(['exec', '--allow-host', 'allowed.test', '--', 'true'], { ...fcEnv, MVM_FIRECRACKER_TAP: 'lo' });
    assert.equal(allowlist.code, 125);
    assert.match(allowlist.stderr.toString(), /^mvmctl: --allow-host and -p need the qemu backend .*use --backend qemu\n$/);
    await assertNoVmLeft(stateDir);
  });
});
