/** src/paths.ts: MVM_* variables, else the XDG base directories, else under HOME (README "Environment"). */
import assert from 'node:assert/strict';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, test } from 'node:test';
import { cacheDir, dataDir, expandHome, stateDir } from '../../src/paths.js';

const NAMES = ['MVM_CACHE_DIR', 'MVM_DATA_DIR', 'MVM_STATE_DIR', 'XDG_CACHE_HOME', 'XDG_DATA_HOME', 'XDG_RUNTIME_DIR', 'HOME'] as const;
const saved = Object.fromEntries(NAMES.map((name) => [name, process.env[name]]));

afterEach(() => {
  for (const name of NAMES) {
    if (saved[name] === undefined) delete process.env[name];
    else process.env[name] = saved[name];
  }
});

/** Sets exactly these of the variables, unsetting the others (HOME is kept unless given). */
function withEnv(values: Partial<Record<(typeof NAMES)[number], string>>): void {
  for (const name of NAMES) {
    if (name === 'HOME' && !(name in values)) continue;
    if (name in values) process.env[name] = values[name];
    else delete process.env[name];
  }
}

const dirs = () => ({ cache: cacheDir(), data: dataDir(), state: stateDir() });

describe('directories', () => {
  test('MVM_CACHE_DIR, MVM_DATA_DIR and MVM_STATE_DIR are used as given, over the XDG variables', () => {
    withEnv({ MVM_CACHE_DIR: '/m/cache', MVM_DATA_DIR: '/m/data', MVM_STATE_DIR: '/m/state', XDG_CACHE_HOME: '/x/cache', XDG_DATA_HOME: '/x/data', XDG_RUNTIME_DIR: '/x/run' });
    assert.deepEqual(dirs(), { cache: '/m/cache', data: '/m/data', state: '/m/state' });
  });

  test('without them: $XDG_CACHE_HOME/mvm, $XDG_DATA_HOME/mvm, $XDG_RUNTIME_DIR/mvm', () => {
    withEnv({ XDG_CACHE_HOME: '/x/cache', XDG_DATA_HOME: '/x/data', XDG_RUNTIME_DIR: '/x/run' });
    assert.deepEqual(dirs(), { cache: '/x/cache/mvm', data: '/x/data/mvm', state: '/x/run/mvm' });
  });

  test('without either: ~/.cache/mvm, ~/.local/share/mvm, ~/.local/state/mvm', () => {
    withEnv({ HOME: '/home/someone' });
    assert.equal(homedir(), '/home/someone', 'homedir() follows HOME');
    assert.deepEqual(dirs(), { cache: '/home/someone/.cache/mvm', data: '/home/someone/.local/share/mvm', state: '/home/someone/.local/state/mvm' });
  });

  test('each variable falls back on its own, and an empty one counts as unset', () => {
    withEnv({ HOME: '/h', MVM_CACHE_DIR: '', XDG_CACHE_HOME: '', MVM_DATA_DIR: '/m/data', XDG_RUNTIME_DIR: '/x/run', MVM_STATE_DIR: '' });
    assert.deepEqual(dirs(), { cache: join('/h', '.cache', 'mvm'), data: '/m/data', state: '/x/run/mvm' });
  });

  test('expandHome: ~ and ~/ only', () => {
    withEnv({ HOME: '/h' });
    assert.equal(expandHome('~'), '/h');
    assert.equal(expandHome('~/x/y'), '/h/x/y');
    for (const unchanged of ['~user/x', '/a/~/b', 'rel', './~']) assert.equal(expandHome(unchanged), unchanged);
  });
});
