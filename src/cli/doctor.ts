import { Command } from 'commander';
import { type DoctorReport, runDoctor } from '../doctor/checks.js';

/** `STATUS  NAME  SUMMARY` rows, each warn/fail followed by its fix, indented under the name. */
export function formatReport(report: DoctorReport): string {
  const statusWidth = Math.max('STATUS'.length, ...report.checks.map((check) => check.status.length));
  const nameWidth = Math.max('NAME'.length, ...report.checks.map((check) => check.name.length));
  const row = (status: string, name: string, summary: string) => `${status.padEnd(statusWidth)}  ${name.padEnd(nameWidth)}  ${summary}`;
  const lines = [row('STATUS', 'NAME', 'SUMMARY')];
  for (const check of report.checks) {
    lines.push(row(check.status, check.name, check.summary));
    if (check.fix && check.status !== 'ok') lines.push(`${' '.repeat(statusWidth + 2)}fix: ${check.fix}`);
  }
  const failed = report.checks.filter((check) => check.status === 'fail').length;
  lines.push('', report.ok ? 'mvmctl exec can run here' : `mvmctl exec cannot run here: ${failed} check${failed === 1 ? '' : 's'} failed`);
  return lines.join('\n') + '\n';
}

export function doctorCommand(): Command {
  return new Command('doctor')
    .description('check that this host has what mvmctl needs, and say how to fix what is missing')
    .option('--json', 'print JSON instead of a table')
    .action(async (options: { json?: boolean }) => {
      const report = await runDoctor();
      process.stdout.write(options.json ? JSON.stringify(report, null, 2) + '\n' : formatReport(report));
      process.exitCode = report.ok ? 0 : 1;
    });
}
