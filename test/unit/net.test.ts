import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, request, type IncomingMessage, type Server } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { nicArgs } from '../../src/backends/qemu/args.js';
import { AllowlistProxy, parseHostsFile } from '../../src/net/proxy.js';
import { guestIpKernelArg, hostAllowed, parseAllowedHost, parsePortForward, planNetwork, proxyEnv } from '../../src/net/spec.js';
import { scratchTree } from './scratch.js';

describe('network plans', () => {
  test('no options: no NIC; --net user: open; --allow-host: restricted to the list; -p alone: restricted, no proxy', () => {
    assert.equal(planNetwork({}), undefined);
    assert.equal(planNetwork({ net: 'none' }), undefined);
    assert.deepEqual(planNetwork({ net: 'user' }), { outbound: 'open', allowHosts: [], forwards: [] });
    assert.deepEqual(planNetwork({ allowHosts: ['PyPI.org', 'x.test:8443'] }), {
      outbound: 'restricted',
      allowHosts: [{ name: 'pypi.org' }, { name: 'x.test', port: 8443 }],
      forwards: [],
    });
    // --allow-host limits outbound access even when --net user is given too.
    assert.equal(planNetwork({ net: 'user', allowHosts: ['a.test'] })?.outbound, 'restricted');
    assert.deepEqual(planNetwork({ publish: ['8080:80'] }), { outbound: 'restricted', allowHosts: [], forwards: [{ hostAddress: '127.0.0.1', hostPort: 8080, guestPort: 80 }] });
  });

  test("a template's default applies unless --net says otherwise", () => {
    assert.equal(planNetwork({}, 'user')?.outbound, 'open');
    assert.equal(planNetwork({ net: 'none' }, 'user'), undefined);
  });

  test('bad specs are one clear error each', () => {
    assert.throws(() => planNetwork({ net: 'bridge' as 'user' }), /--net: 'bridge' is not one of none, user/);
    assert.throws(() => parseAllowedHost('http://x.test'), /--allow-host 'http:\/\/x.test': not NAME\[:PORT\]/);
    assert.throws(() => parseAllowedHost('x.test:0'), /0 is not a port/);
    assert.throws(() => parseAllowedHost('x.test:70000'), /70000 is not a port/);
    assert.throws(() => parseAllowedHost('a..b'), /not NAME/);
    assert.throws(() => parsePortForward('80'), /-p '80': not \[ADDRESS:\]HOSTPORT:GUESTPORT/);
    assert.throws(() => parsePortForward('localhost:80:80'), /localhost is not an IPv4 address/);
    assert.throws(() => planNetwork({ publish: ['8080:80', '127.0.0.1:8080:81'] }), /host port 127.0.0.1:8080 is forwarded twice/);
  });

  test('forwards bind to loopback unless an address is named', () => {
    assert.deepEqual(parsePortForward('8080:80'), { hostAddress: '127.0.0.1', hostPort: 8080, guestPort: 80 });
    assert.deepEqual(parsePortForward('0.0.0.0:9000:22'), { hostAddress: '0.0.0.0', hostPort: 9000, guestPort: 22 });
  });

  test('the allowlist: exact names, *.domain, and ports 80/443 unless one is named', () => {
    const list = [parseAllowedHost('a.test'), parseAllowedHost('*.b.test'), parseAllowedHost('c.test:8443'), parseAllowedHost('10.1.2.3:22')];
    assert.ok(hostAllowed(list, 'a.test', 80));
    assert.ok(hostAllowed(list, 'A.Test.', 443));
    assert.ok(!hostAllowed(list, 'a.test', 8080));
    assert.ok(!hostAllowed(list, 'xa.test', 80));
    assert.ok(hostAllowed(list, 'deep.x.b.test', 443));
    assert.ok(!hostAllowed(list, 'b.test', 443), '*.b.test names what is under b.test');
    assert.ok(!hostAllowed(list, 'evilb.test', 443));
    assert.ok(hostAllowed(list, 'c.test', 8443));
    assert.ok(!hostAllowed(list, 'c.test', 443));
    assert.ok(hostAllowed(list, '10.1.2.3', 22));
  });

  test('the kernel configures the NIC; only an open network gets a resolver; only an allowlist gets proxy variables', () => {
    const open = planNetwork({ net: 'user' })!;
    const listed = planNetwork({ allowHosts: ['a.test'] })!;
    assert.equal(guestIpKernelArg(open), 'ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3');
    assert.equal(guestIpKernelArg(listed), 'ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off');
    assert.deepEqual(proxyEnv(open), {});
    assert.deepEqual(proxyEnv(planNetwork({ publish: ['1:2'] })!), {});
    assert.equal(proxyEnv(listed).HTTPS_PROXY, 'http://10.0.2.100:3128');
    assert.equal(proxyEnv(listed).no_proxy, 'localhost,127.0.0.1');
  });

  test("QEMU's NIC: restrict=on for restricted guests, loopback forwards, and the proxy command quoted for libslirp", () => {
    const [, netdev, , device] = nicArgs({ restricted: true, proxySocket: '/st,ate/proxy.sock', forwards: [{ hostAddress: '127.0.0.1', hostPort: 8080, guestPort: 80 }] }, ['/usr/bin/socat', '-', 'UNIX-CONNECT:/st,ate/proxy.sock']);
    assert.equal(
      netdev,
      "user,id=net0,net=10.0.2.0/24,restrict=on,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,guestfwd=tcp:10.0.2.100:3128-cmd:'/usr/bin/socat' '-' 'UNIX-CONNECT:/st,,ate/proxy.sock'",
    );
    assert.equal(device, 'virtio-net-device,netdev=net0,mac=52:54:00:12:34:56');
    assert.equal(nicArgs({ restricted: false, forwards: [] }, undefined)[1], 'user,id=net0,net=10.0.2.0/24,restrict=off');
  });

  test('hosts files: ADDRESS NAME... lines, comments and junk ignored, the first mapping wins', () => {
    const hosts = parseHostsFile('# c\n127.0.0.1 Allowed.test other.test\n\nbogus line\n10.0.0.1 allowed.test\n::1 six.test\n');
    assert.deepEqual([...hosts], [['allowed.test', '127.0.0.1'], ['other.test', '127.0.0.1']]);
  });
});

describe('the allowlist proxy', () => {
  const scratch = scratchTree('mvm-net-');
  let origin: Server;
  let originPort: number;
  let proxy: AllowlistProxy;
  let socketPath: string;
  const refused: string[] = [];
  const seen: IncomingMessage[] = [];

  before(async () => {
    origin = createServer((req, res) => {
      seen.push(req);
      res.setHeader('connection', 'close');
      res.end(`hello from ${req.headers.host} ${req.url}`);
    });
    origin.listen(0, '127.0.0.1');
    await once(origin, 'listening');
    originPort = (origin.address() as AddressInfo).port;
    socketPath = join(scratch.fresh('proxy'), 'proxy.sock');
    proxy = await AllowlistProxy.start({
      socketPath,
      allowHosts: [parseAllowedHost(`allowed.test:${originPort}`)],
      hosts: parseHostsFile('127.0.0.1 allowed.test denied.test\n'),
      onRefused: (line) => refused.push(line),
    });
  });

  after(async () => {
    await proxy.close();
    origin.close();
  });

  function viaProxy(options: { method?: string; path: string; headers?: Record<string, string> }): Promise<{ status: number; body: string; headers: IncomingMessage['headers'] }> {
    return new Promise((resolve, reject) => {
      const req = request({ socketPath, method: options.method ?? 'GET', path: options.path, headers: options.headers });
      req.on('response', (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (body += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
      });
      req.on('error', reject);
      req.end();
    });
  }

  test('an allowed name is fetched, with Host from the URL and no proxy credentials passed on', async () => {
    const answer = await viaProxy({ path: `http://allowed.test:${originPort}/x?y=1`, headers: { host: 'elsewhere.test', 'proxy-authorization': 'Basic c2VjcmV0' } });
    assert.equal(answer.status, 200);
    assert.equal(answer.body, `hello from allowed.test:${originPort} /x?y=1`);
    assert.equal(seen.at(-1)!.headers['proxy-authorization'], undefined);
  });

  test('a name not on the list gets a 403 that says why, and one host line', async () => {
    const answer = await viaProxy({ path: `http://denied.test:${originPort}/` });
    assert.equal(answer.status, 403);
    assert.match(answer.body, new RegExp(`denied.test:${originPort} is not allowed: this VM may reach only allowed.test:${originPort} \\(--allow-host\\)`));
    assert.equal(answer.headers['x-mvm-refused'], 'allow-host');
    assert.match(refused.at(-1)!, new RegExp(`\\[net\\] refused GET denied.test:${originPort}: not allowed by --allow-host`));
    // The allowed name on a port not listed is refused too.
    assert.equal((await viaProxy({ path: 'http://allowed.test:1/' })).status, 403);
  });

  test('a request that is not for a proxy (a relative URL) gets a 400', async () => {
    assert.equal((await viaProxy({ path: '/' })).status, 400);
  });

  test('a guest cannot smuggle another host past the list: userinfo, junk CONNECT targets, Host headers', async () => {
    // http://allowed.test@denied.test/ names denied.test (allowed.test is only userinfo).
    assert.equal((await viaProxy({ path: `http://allowed.test:${originPort}@denied.test:${originPort}/` })).status, 403);
    assert.equal((await connectVia(`allowed.test:${originPort}@denied.test:${originPort}`)).status, 400);
    assert.equal((await connectVia('allowed.test')).status, 400);
    const before = seen.length;
    await viaProxy({ path: `http://allowed.test:${originPort}/h`, headers: { host: 'denied.test' } });
    assert.equal(seen.length, before + 1);
    assert.equal(seen.at(-1)!.headers.host, `allowed.test:${originPort}`, 'the upstream sees the URL\'s host, never the guest\'s Host header');
  });

  test('what a guest can make the proxy hold is bounded: header size, and connections at once', async () => {
    const huge = await viaProxy({ path: `http://allowed.test:${originPort}/`, headers: { 'x-fill': 'a'.repeat(64 * 1024) } }).catch((error: Error) => error);
    assert.ok(huge instanceof Error ? /socket hang up|ECONNRESET/.test(huge.message) : huge.status === 431, 'a 64 KiB header is refused');
    const idle: Socket[] = [];
    try {
      for (let i = 0; i < 64; i++) {
        const socket = connect(socketPath);
        await once(socket, 'connect');
        idle.push(socket);
      }
      const extra = connect(socketPath);
      idle.push(extra);
      // Past the limit the server drops the connection at once, without reading from it.
      await once(extra, 'close');
    } finally {
      for (const socket of idle) socket.destroy();
    }
  });

  function connectVia(target: string): Promise<{ status: number; socket: Socket; head: Buffer }> {
    return new Promise((resolve, reject) => {
      const req = request({ socketPath, method: 'CONNECT', path: target });
      req.on('connect', (res, socket, head) => resolve({ status: res.statusCode ?? 0, socket, head }));
      req.on('response', (res) => resolve({ status: res.statusCode ?? 0, socket: res.socket, head: Buffer.alloc(0) }));
      req.on('error', reject);
      req.end();
    });
  }

  test('CONNECT to an allowed name tunnels bytes; to another name it is refused', async () => {
    const tunnel = await connectVia(`allowed.test:${originPort}`);
    assert.equal(tunnel.status, 200);
    tunnel.socket.write(`GET /tunnelled HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n`);
    let text = tunnel.head.toString();
    for await (const chunk of tunnel.socket) text += String(chunk);
    assert.match(text, /hello from t \/tunnelled/);

    const refusedTunnel = await connectVia(`denied.test:${originPort}`);
    assert.equal(refusedTunnel.status, 403);
    refusedTunnel.socket.destroy();
    assert.match(refused.at(-1)!, /refused CONNECT denied.test/);
  });
});
