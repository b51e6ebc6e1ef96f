import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { InvalidArgumentError } from 'commander';
import { bootTimeoutFromEnv, parseGuestDir, parseIntegerIn, parseMemory, parseUserFlag } from '../../src/cli/parse.js';
import { GID_OF_USER } from '../../src/protocol/index.js';
import { parseUser } from '../../src/sdk/parse.js';
import { MvmError } from '../../src/errors.js';
import { ConsoleBuffer } from '../../src/backends/console.js';
import { parseEnvAssignment, parseEnvFile } from '../../src/launchplan/env.js';

const NAME_RULE = 'must match [A-Za-z_][A-Za-z0-9_]* (and not be __proto__)';

/** Asserts `action` throws a one-line MvmError (exit 125) with exactly `message`. */
function refused(action: () => unknown, message: string): void {
  assert.throws(action, (error: unknown) => {
    assert.ok(error instanceof MvmError, String(error));
    assert.equal(error.exitCode, 125);
    assert.equal(error.message, message);
    return true;
  });
}

describe('--memory sizes', () => {
  test('suffixes are binary units; a bare number is MiB', () => {
    assert.equal(parseMemory('512'), 512);
    assert.equal(parseMemory('512M'), 512);
    assert.equal(parseMemory('2G'), 2048);
    assert.equal(parseMemory('1g'), 1024);
    assert.equal(parseMemory('262144K'), 256);
    assert.equal(parseMemory('1GiB'), 1024);
  });

  test('nonsense, fractions of a MiB and tiny guests are refused', () => {
    for (const bad of ['lots', '', '1.5G', '-1', '100K', '32M', '2T']) {
      assert.throws(() => parseMemory(bad), InvalidArgumentError, bad);
    }
  });
});

test('integer options are whole numbers within their range', () => {
  const cpus = parseIntegerIn(1, 64);
  assert.equal(cpus('4'), 4);
  for (const bad of ['0', '65', '1.5', 'two', '-1', '']) assert.throws(() => cpus(bad), InvalidArgumentError, bad);
});

describe('-u/--user UID[:GID]', () => {
  test('numeric ids; without a GID the guest picks the group', () => {
    assert.deepEqual(parseUser('1000', 'user'), { uid: 1000, gid: GID_OF_USER });
    assert.deepEqual(parseUser('1000:100', 'user'), { uid: 1000, gid: 100 });
    assert.deepEqual(parseUser(0, 'user'), { uid: 0, gid: GID_OF_USER });
    assert.deepEqual(parseUser({ uid: 7, gid: 8 }, 'user'), { uid: 7, gid: 8 });
    assert.deepEqual(parseUser({ uid: 7 }, 'user'), { uid: 7, gid: GID_OF_USER });
    assert.equal(parseUserFlag('1000:1000'), '1000:1000');
  });

  test('names, negative ids, (uid_t)-1 and junk are refused with one line', () => {
    refused(() => parseUser('nobody', 'user'), "user: 'nobody' is not UID[:GID] (numeric ids; names are not looked up)");
    refused(() => parseUser('4294967295', 'user'), "user: '4294967295' is not between 0 and 4294967294");
    refused(() => parseUser({ uid: -1 }, 'user'), "user.uid: '-1' is not between 0 and 4294967294");
    for (const bad of ['', ':', '1000:', ':1000', '1:2:3', '1000:staff', '-5', '1e3']) {
      assert.throws(() => parseUserFlag(bad), InvalidArgumentError, bad);
    }
  });
});

describe('guest console buffer', () => {
  test('keeps the last lines, split across chunks, and bounds their length', () => {
    const buffer = new ConsoleBuffer();
    const seen: string[] = [];
    buffer.push(Buffer.from('first\r\nsec'), (line) => seen.push(line));
    buffer.push(Buffer.from('ond\nthird'), (line) => seen.push(line));
    assert.deepEqual(seen, ['first', 'second']);
    assert.deepEqual(buffer.tail(2), ['second', 'third']);
    buffer.push(Buffer.from('x'.repeat(10_000) + '\n'));
    assert.ok(buffer.tail(1)[0].length <= 4096);
    const name = Buffer.from('名前\n');
    buffer.push(name.subarray(0, 4));
    buffer.push(name.subarray(4));
    assert.deepEqual(buffer.tail(1), ['名前'], 'a character split between chunks');
  });

  test('a guest that prints without end cannot grow it', () => {
    const buffer = new ConsoleBuffer();
    for (let i = 0; i < 10_000; i++) buffer.push(Buffer.from(`line ${i}\n`));
    assert.equal(buffer.tail(1_000_000).length, 200);
    assert.equal(buffer.tail(1)[0], 'line 9999');
  });
});

test('MVM_BOOT_TIMEOUT: seconds, default 60, nonsense refused in one line', () => {
  const saved = process.env.MVM_BOOT_TIMEOUT;
  try {
    delete process.env.MVM_BOOT_TIMEOUT;
    assert.equal(bootTimeoutFromEnv(), 60_000);
    process.env.MVM_BOOT_TIMEOUT = '2.5';
    assert.equal(bootTimeoutFromEnv(), 2_500);
    for (const bad of ['abc', '0', '-3']) {
      process.env.MVM_BOOT_TIMEOUT = bad;
      assert.throws(() => bootTimeoutFromEnv(), MvmError, bad);
    }
  } finally {
    if (saved === undefined) delete process.env.MVM_BOOT_TIMEOUT;
    else process.env.MVM_BOOT_TIMEOUT = saved;
  }
});

test('-w/--workdir: an absolute guest path', () => {
  assert.equal(parseGuestDir('/new/dir'), '/new/dir');
  for (const bad of ['rel', '', './x', '/a\0b']) assert.throws(() => parseGuestDir(bad), InvalidArgumentError, bad);
});

describe('-e/--env KEY[=VALUE]', () => {
  const environment = { FROM_ENV: 'host value', EMPTY: '' };

  test('splits at the first "="', () => {
    assert.deepEqual(parseEnvAssignment('K=V', environment), ['K', 'V']);
    assert.deepEqual(parseEnvAssignment('_k1=', environment), ['_k1', '']);
    assert.deepEqual(parseEnvAssignment('URL=a=b', environment), ['URL', 'a=b']);
  });

  test("a bare KEY takes mvmctl's own value, and is left out when unset there, as docker does", () => {
    assert.deepEqual(parseEnvAssignment('FROM_ENV', environment), ['FROM_ENV', 'host value']);
    assert.deepEqual(parseEnvAssignment('EMPTY', environment), ['EMPTY', '']);
    assert.equal(parseEnvAssignment('UNSET', environment), undefined);
    assert.equal(parseEnvAssignment('toString', environment), undefined, 'not a property of the environment object');
  });

  test('refuses a bad name, by the same rule as launch plans', () => {
    for (const [arg, key] of [['1K=v', '1K'], ['=v', ''], ['A-B=v', 'A-B'], ['__proto__=v', '__proto__'], ['1K', '1K'], ['', '']]) {
      refused(() => parseEnvAssignment(arg!, environment), `--env ${JSON.stringify(arg)}: variable name ${JSON.stringify(key)} ${NAME_RULE}`);
    }
  });
});

describe('--env-file (docker run format)', () => {
  const environment = { FROM_ENV: 'host value' };
  const parse = (text: string) => parseEnvFile(text, 'env file f.env', environment);

  test('KEY=VALUE lines taken literally; # comments, blank lines and leading whitespace skipped', () => {
    const text = [
      '# a comment',
      '',
      '   ',
      'A=1',
      '  B=two words  ',
      'Q="quoted"',
      "S='single'",
      'URL=a=b#c',
      '\t# an indented comment',
      'EMPTY=',
    ].join('\n');
    assert.deepEqual(parse(text), { A: '1', B: 'two words  ', Q: '"quoted"', S: "'single'", URL: 'a=b#c', EMPTY: '' });
  });

  test('a line KEY alone takes the environment\'s value, or is left out; a later line wins', () => {
    assert.deepEqual(parse('FROM_ENV\nUNSET\nA=1\nA=2'), { FROM_ENV: 'host value', A: '2' });
  });

  test('CRLF line ends and a byte-order mark are not part of keys or values', () => {
    assert.deepEqual(parse('\uFEFFA=1\r\nB=2\r\n'), { A: '1', B: '2' });
  });

  test('a bad line: one error naming the file and the line number', () => {
    refused(() => parse('A=1\n\nB C=2'), `env file f.env, line 3: variable name "B C" ${NAME_RULE}`);
    refused(() => parse('=x'), `env file f.env, line 1: variable name "" ${NAME_RULE}`);
    refused(() => parse('A=1\nKEY '), `env file f.env, line 2: variable name "KEY " ${NAME_RULE}`);
    refused(() => parse('export A=1'), `env file f.env, line 1: variable name "export A" ${NAME_RULE}`);
    refused(() => parse('A=x\0y'), 'env file f.env, line 1: the value of A contains a NUL byte, which cannot reach the guest');
  });
});
