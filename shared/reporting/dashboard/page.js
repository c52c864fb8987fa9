'use strict';
// The operations dashboard. Draws itself from GET /api/report every REFRESH_MS.
// Every label (account, category, SMTP code, problem text) comes from producers or from the wire:
// it only ever reaches the page through textContent or an SVG attribute, never as markup. The
// page's CSP also forbids inline handlers and requires Trusted Types, so an innerHTML slip throws.
(function () {
  const REFRESH_MS = 15000;
  // The 7-day report (by UTC day: one row per day, account and category) changes slowly: it is
  // asked for every 5 minutes, and again at once after it failed.
  const WEEK_REFRESH_MS = 300000;
  let weekAt = null;
  const HOUR = 3600000;
  const DAY = 24 * HOUR;
  const OUTCOMES = ['sent', 'refused', 'dead'];
  const KINDS = ['internal', 'external'];
  // Message-trace statuses (recipients) shown beside the send outcomes, grouped; the delivery
  // table below lists every status as the report has it.
  const RESULTS = { delivered: ['delivered', 'expanded'], failed: ['failed'], quarantined: ['quarantined'],
    pending: ['pending', 'gettingStatus'], other: ['filteredAsSpam', 'recalled'] };
  const RESULT_KEYS = Object.keys(RESULTS);
  // Send latency: p50 and p95 are the upper bound of the histogram bucket holding them (the
  // report's latency section); null means above the last bound.
  const QUANTILES = ['p50', 'p95'];
  const HEALTH = ['healthy', 'cooling-down', 'unhealthy'];
  const SVG_NS = 'http://www.w3.org/2000/svg';
  // The function key the page was opened with (?code=...). It goes to /api/report in the
  // x-functions-key header, not the URL, so the refreshes do not write it into request logs.
  const KEY = new URLSearchParams(location.search).get('code');

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function num(value) { return typeof value === 'number' && isFinite(value) ? value : 0; }
  function int(value) { return value === null || value === undefined ? '–' : String(value); }
  function money(value, currency) {
    if (typeof value !== 'number') return '–';
    return (currency === 'USD' || !currency ? '$' : currency + ' ') + value.toFixed(value < 1 ? 6 : 2);
  }
  function pct(part, whole) { return whole > 0 ? (100 * part / whole).toFixed(1) + ' %' : '–'; }
  function utc(iso, withDate) {
    if (!iso) return null;
    const d = new Date(iso);
    if (isNaN(d)) return String(iso);
    const s = d.toISOString();
    return (withDate === false ? s.slice(11, 16) : s.slice(0, 10) + ' ' + s.slice(11, 16)) + ' UTC';
  }
  function age(seconds) {
    if (typeof seconds !== 'number') return '–';
    if (seconds < 90) return Math.round(seconds) + ' s';
    if (seconds < 5400) return Math.round(seconds / 60) + ' min';
    return (seconds / 3600).toFixed(1) + ' h';
  }
  function sumValues(obj) { return Object.values(obj || {}).reduce((a, b) => a + num(b), 0); }
  // A latency estimate: the upper bound of its histogram bucket, or above the last bound.
  function seconds(value, bounds) {
    if (typeof value !== 'number') {
      const last = (bounds || []).length ? bounds[bounds.length - 1] : null;
      return last === null ? '–' : '> ' + seconds(last);
    }
    if (value < 60) return value + ' s';
    if (value < 3600) return +(value / 60).toFixed(1) + ' min';
    return +(value / 3600).toFixed(1) + ' h';
  }
  function results(delivery) {
    const out = {};
    for (const [group, statuses] of Object.entries(RESULTS)) {
      out[group] = statuses.reduce((sum, s) => sum + num((delivery || {})[s]), 0);
    }
    return out;
  }
  function traced(delivery) { return Object.values(delivery || {}).some((n) => num(n) !== 0); }

  function tile(label, value, field, note) {
    const box = el('div', { class: 'tile' });
    box.append(el('span', { class: 'label' }, label));
    box.append(el('span', field ? { class: 'value', 'data-field': field } : { class: 'value' }, value));
    if (note) box.append(el('span', { class: 'note' }, note));
    return box;
  }

  function cell(text, attrs) { return el('td', attrs, text); }
  function numCell(value, field) {
    return el('td', field ? { class: 'num', 'data-field': field } : { class: 'num' }, int(value));
  }
  function labelCell(text) {
    // An empty category is shown as "(none)" in a distinct style, so a producer's category
    // literally named "(none)" still reads differently.
    return text ? el('td', { class: 'label' }, text) : el('td', { class: 'label none' }, '(none)');
  }
  function emptyRow(tbody, columns, text) {
    tbody.append(el('tr', {}, null));
    tbody.lastChild.append(el('td', { class: 'empty', colspan: columns }, text));
  }

  function meter(used, limit) {
    const box = svg('svg', { class: 'meter', viewBox: '0 0 90 10', role: 'img',
      'aria-label': used + ' of ' + limit });
    box.append(svg('rect', { class: 'track', x: 0, y: 0, width: 90, height: 10, rx: 2 }));
    const share = limit > 0 ? Math.min(1, used / limit) : 1;
    box.append(svg('rect', { class: share >= 0.9 ? 'fill over' : 'fill', x: 0, y: 0,
      width: (90 * share).toFixed(1), height: 10, rx: 2 }));
    return box;
  }

  function usedCell(used, remaining) {
    const td = el('td');
    if (remaining === null || remaining === undefined) {
      td.append(el('span', {}, used + ' / no limit'));
      return td;
    }
    const limit = used + remaining;
    td.append(el('span', {}, used + ' / ' + limit));
    td.append(meter(used, limit));
    return td;
  }

  function renderNow(report) {
    const status = report.status || {};
    const tenant = status.tenant || {};
    const queues = report.queues || {};
    const mail = queues.mail || {};
    const poison = queues.poison || {};
    const budget = report.budget || {};
    const tiles = document.getElementById('now-tiles');
    tiles.replaceChildren(
      tile('on the queue', int(mail.depth), 'queue.depth', 'oldest ' + age(mail.oldestAgeSeconds)),
      tile('poison queue', int(poison.depth), 'poison.depth', 'oldest ' + age(poison.oldestAgeSeconds)),
      tile('recipients today (tenant)', int(tenant.recipients_today), 'tenant.recipients_today',
        tenant.cap ? 'cap ' + tenant.cap + ', ' + int(tenant.remaining) + ' left' : 'no tenant cap'),
      tile('budget spent today', int(budget.spentToday), 'budget.spentToday',
        budget.dailyRecipientBudget ? 'of ' + budget.dailyRecipientBudget + ' recipients' : 'no daily budget set'),
      tile('cost today', money(budget.costToday, budget.currency), 'budget.costToday',
        'at ' + money(budget.pricePerMillionRecipients, budget.currency) + ' per million recipients'),
      tile('limits profile', status.limits_profile || '–', null,
        'day ends ' + (utc(status.daily_window_ends) || '–')),
    );
    const tbody = document.querySelector('#accounts tbody');
    tbody.replaceChildren();
    const accounts = status.accounts || [];
    if (!accounts.length) emptyRow(tbody, 9, 'no accounts configured');
    for (const a of accounts) {
      const used = a.used_today || {};
      const left = a.remaining_today || {};
      const next = a.next_free_slot || {};
      const recipients = num(used.internal_recipients) + num(used.external_recipients);
      const row = el('tr', { 'data-account-row': '' });
      row.append(cell(a.account, { class: 'label' }));
      const health = el('td');
      health.append(el('span', { class: 'badge ' + (HEALTH.includes(a.health) ? a.health : 'unknown') }, a.health));
      row.append(health);
      row.append(usedCell(recipients, left.recipients));
      row.append(('external' in next) ? usedCell(num(used.external_recipients), left.external_recipients)
        : cell('not allowed', { class: 'empty' }));
      row.append(numCell(used.messages));
      row.append(cell(next.internal ? utc(next.internal) : 'now'));
      row.append(cell(!('external' in next) ? '–' : (next.external ? utc(next.external) : 'now')));
      row.append(cell(utc(a.cooldown_until) || '–'));
      row.append(cell(a.last_problem || '–'));
      tbody.append(row);
    }
  }

  // Sum the series per bucket (an hour, or a UTC day): outcomes, recipients, delivery results.
  function perBucket(report, since, count, step) {
    const buckets = Array.from({ length: count }, () => {
      const b = { sent: 0, refused: 0, dead: 0, internal: 0, external: 0 };
      for (const k of RESULT_KEYS) b[k] = 0;
      return b;
    });
    for (const row of report.series || []) {
      const i = Math.floor((new Date(row.start) - since) / step);
      if (!(i >= 0 && i < count)) continue;
      for (const k of OUTCOMES) buckets[i][k] += num((row.requests || {})[k]);
      for (const k of KINDS) buckets[i][k] += num((row.recipients || {})[k]);
      const r = results(row.delivery);
      for (const k of RESULT_KEYS) buckets[i][k] += r[k];
    }
    // A status moving between hours may leave a bucket below zero for a moment: drawn as none.
    for (const b of buckets) for (const k of RESULT_KEYS) b[k] = Math.max(0, b[k]);
    return buckets;
  }

  function bucketLabel(start, step, i, count) {
    if (step >= DAY) return start.toISOString().slice(5, 10);
    if (count <= 48) return start.getUTCHours() % 6 === 0 ? utc(start.toISOString(), false).slice(0, 5) : null;
    return start.getUTCHours() === 0 ? start.toISOString().slice(5, 10) : null;
  }
  function bucketName(start, step) {
    return step >= DAY ? start.toISOString().slice(0, 10) + ' (UTC day)' : utc(start.toISOString());
  }

  function chart(title, keys, buckets, since, step, name) {
    const W = 640, H = 170, left = 40, right = 8, top = 8, bottom = 22;
    const plotW = W - left - right, plotH = H - top - bottom;
    const figure = el('figure', { 'data-chart': name });
    figure.append(el('figcaption', {}, title));
    const box = svg('svg', { class: 'chart', viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': title });
    const max = Math.max(0, ...buckets.map((b) => keys.reduce((s, k) => s + b[k], 0)));
    const barW = plotW / buckets.length;
    box.append(svg('line', { class: 'axis', x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }));
    if (max === 0) {
      box.append(svg('text', { class: 'nodata', x: left + plotW / 2, y: top + plotH / 2, 'text-anchor': 'middle' },
        'nothing in this period'));
    } else {
      for (const value of [max, Math.round(max / 2)]) {
        const y = top + plotH - plotH * value / max;
        box.append(svg('line', { class: 'axis', x1: left, y1: y, x2: left + plotW, y2: y }));
        box.append(svg('text', { class: 'tick', x: left - 4, y: y + 3, 'text-anchor': 'end' }, value));
      }
    }
    buckets.forEach((b, i) => {
      const start = new Date(since.getTime() + i * step);
      let y = top + plotH;
      for (const k of keys) {
        if (!b[k]) continue;
        const h = plotH * b[k] / max;
        y -= h;
        const rect = svg('rect', { class: 'bar ' + k, x: (left + i * barW + barW * 0.1).toFixed(2), y: y.toFixed(2),
          width: Math.max(0.5, barW * 0.8).toFixed(2), height: h.toFixed(2), 'data-key': k, 'data-value': b[k] });
        rect.append(svg('title', {}, bucketName(start, step) + ': ' + b[k] + ' ' + k));
        box.append(rect);
      }
      // Hour labels every 6 h on a day of hours, dates on a chart of days.
      const label = bucketLabel(start, step, i, buckets.length);
      if (label && left + i * barW < W - 30) {
        box.append(svg('text', { class: 'tick', x: left + i * barW, y: H - 6, 'text-anchor': 'start' }, label));
      }
    });
    figure.append(box);
    figure.append(legend(keys));
    return figure;
  }

  function legend(keys) {
    const box = el('div', { class: 'legend' });
    for (const k of keys) {
      box.append(el('span', { class: 'swatch ' + k }));
      box.append(document.createTextNode(k));
    }
    return box;
  }

  // p50 and p95 per bucket as bars side by side, on the histogram's own scale: one step per bucket
  // bound (1 s ... 1 h, then above), so a bar's height is the bucket its quantile falls in.
  function latencyChart(title, latency, since, count, step, name) {
    const W = 640, H = 170, left = 48, right = 8, top = 8, bottom = 22;
    const plotW = W - left - right, plotH = H - top - bottom;
    const bounds = latency.bounds || [];
    const levels = bounds.length + 1;
    const level = (v) => (typeof v === 'number' ? bounds.indexOf(v) + 1 : levels);
    const figure = el('figure', { 'data-chart': name });
    figure.append(el('figcaption', {}, title));
    const box = svg('svg', { class: 'chart', viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': title });
    box.append(svg('line', { class: 'axis', x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }));
    const rows = latency.series || [];
    if (!rows.length) {
      box.append(svg('text', { class: 'nodata', x: left + plotW / 2, y: top + plotH / 2, 'text-anchor': 'middle' },
        'nothing sent in this period'));
    } else {
      bounds.forEach((b, i) => {
        if (![10, 60, 600, 3600].includes(b)) return;
        const y = top + plotH - plotH * (i + 1) / levels;
        box.append(svg('line', { class: 'axis', x1: left, y1: y, x2: left + plotW, y2: y }));
        box.append(svg('text', { class: 'tick', x: left - 4, y: y + 3, 'text-anchor': 'end' }, seconds(b)));
      });
    }
    const barW = plotW / count;
    for (const row of rows) {
      const i = Math.floor((new Date(row.start) - since) / step);
      if (!(i >= 0 && i < count)) continue;
      const start = new Date(since.getTime() + i * step);
      QUANTILES.forEach((q, j) => {
        const h = plotH * level(row[q]) / levels;
        const rect = svg('rect', { class: 'bar ' + q, x: (left + i * barW + barW * (0.1 + 0.4 * j)).toFixed(2),
          y: (top + plotH - h).toFixed(2), width: Math.max(0.5, barW * 0.4).toFixed(2), height: h.toFixed(2),
          'data-key': q, 'data-start': row.start, 'data-value': typeof row[q] === 'number' ? row[q] : 'above' });
        rect.append(svg('title', {}, bucketName(start, step) + ': ' + q + ' ' + seconds(row[q], bounds)
          + ' (' + row.count + ' sent)'));
        box.append(rect);
      });
    }
    for (let i = 0; i < count; i++) {
      const label = bucketLabel(new Date(since.getTime() + i * step), step, i, count);
      if (label && left + i * barW < W - 30) {
        box.append(svg('text', { class: 'tick', x: left + i * barW, y: H - 6, 'text-anchor': 'start' }, label));
      }
    }
    figure.append(box);
    figure.append(legend(QUANTILES));
    return figure;
  }

  function latencyTable(latency, prefix, per) {
    const bounds = latency.bounds || [];
    const table = el('table', { 'data-table': prefix + '.latency' });
    const head = el('tr');
    for (const h of [per, 'sent', 'p50', 'p95', 'slowest account (by p95)', 'its p50', 'its p95', 'its sent']) {
      head.append(el('th', ['sent', 'p50', 'p95', 'its p50', 'its p95', 'its sent'].includes(h) ? { class: 'num' } : {}, h));
    }
    table.append(el('thead'));
    table.firstChild.append(head);
    const tbody = el('tbody');
    const rows = latency.series || [];
    if (!rows.length) emptyRow(tbody, 8, 'nothing sent in this period');
    for (const r of rows) {
      const slow = r.slowest || {};
      const tr = el('tr', { 'data-latency-row': '' });
      tr.append(cell(per === 'day' ? String(r.start).slice(0, 10) : utc(r.start)), numCell(r.count),
        el('td', { class: 'num' }, seconds(r.p50, bounds)), el('td', { class: 'num' }, seconds(r.p95, bounds)),
        cell(slow.account, { class: 'label' }), el('td', { class: 'num' }, seconds(slow.p50, bounds)),
        el('td', { class: 'num' }, seconds(slow.p95, bounds)), numCell(slow.count));
      tbody.append(tr);
    }
    table.append(tbody);
    return table;
  }

  function categoriesTable(report, prefix) {
    const byCategory = new Map();
    for (const row of report.series || []) {
      const key = row.category || '';
      const c = byCategory.get(key) || { sent: 0, refused: 0, dead: 0, deferrals: 0, internal: 0, external: 0, suppressed: 0 };
      for (const k of OUTCOMES) c[k] += num((row.requests || {})[k]);
      for (const k of KINDS) c[k] += num((row.recipients || {})[k]);
      c.suppressed += num((row.recipients || {}).suppressed);
      c.deferrals += num(row.deferrals);
      byCategory.set(key, c);
    }
    const table = el('table', { 'data-table': prefix + '.categories' });
    const head = el('tr');
    for (const h of ['category', 'sent', 'refused', 'dead', 'deferrals', 'internal', 'external', 'suppressed']) {
      head.append(el('th', h === 'category' ? {} : { class: 'num' }, h));
    }
    table.append(el('thead'));
    table.firstChild.append(head);
    const tbody = el('tbody');
    const rows = [...byCategory.entries()].sort((a, b) => (b[1].sent + b[1].refused + b[1].dead)
      - (a[1].sent + a[1].refused + a[1].dead) || (a[0] < b[0] ? -1 : 1));
    if (!rows.length) emptyRow(tbody, 8, 'no requests in this period');
    for (const [name, c] of rows) {
      const tr = el('tr', { 'data-category-row': '' });
      tr.append(labelCell(name));
      for (const k of ['sent', 'refused', 'dead', 'deferrals', 'internal', 'external', 'suppressed']) tr.append(numCell(c[k]));
      tbody.append(tr);
    }
    table.append(tbody);
    return table;
  }

  function errorsTable(report, prefix) {
    const table = el('table', { 'data-table': prefix + '.errors' });
    const head = el('tr');
    for (const h of ['SMTP reply', 'account', 'count', 'last seen']) head.append(el('th', h === 'count' ? { class: 'num' } : {}, h));
    table.append(el('thead'));
    table.firstChild.append(head);
    const tbody = el('tbody');
    const errors = report.errors || [];
    if (!errors.length) emptyRow(tbody, 4, 'no SMTP errors in this period');
    for (const e of errors) {
      const tr = el('tr', { 'data-error-row': '' });
      tr.append(cell(e.code, { class: 'label' }), cell(e.account, { class: 'label' }), numCell(e.count), cell(utc(e.lastSeen) || '–'));
      tbody.append(tr);
    }
    table.append(tbody);
    return table;
  }

  function deliveryTable(delivery, prefix) {
    const total = sumValues(delivery);
    const table = el('table', { 'data-table': prefix + '.delivery' });
    const head = el('tr');
    for (const h of ['status', 'recipients', 'share']) head.append(el('th', h === 'status' ? {} : { class: 'num' }, h));
    table.append(el('thead'));
    table.firstChild.append(head);
    const tbody = el('tbody');
    for (const [status, count] of Object.entries(delivery).sort((a, b) => num(b[1]) - num(a[1]))) {
      const tr = el('tr');
      tr.append(cell(status, { class: 'label' }), numCell(count), el('td', { class: 'num' }, pct(num(count), total)));
      tbody.append(tr);
    }
    table.append(tbody);
    return table;
  }

  function renderWindow(section, report) {
    const prefix = section.id;
    const since = new Date(report.since);
    const until = new Date(report.until);
    const per = report.bucket === 'day' ? 'day' : 'hour';
    const step = per === 'day' ? DAY : HOUR;
    const count = Math.max(1, Math.ceil((until - since) / step));
    const totals = report.totals || {};
    const req = totals.requests || {};
    const rec = totals.recipients || {};
    const delivery = totals.delivery || {};
    const delivered = sumValues(delivery);
    const isTraced = traced(delivery);
    const latency = report.latency || { bounds: [], series: [], totals: {}, accounts: [] };
    const slowest = (latency.accounts || [])[0];
    const budget = report.budget || {};
    const heading = section.querySelector('h2');
    const body = el('div', { class: 'window-body' });
    body.append(el('p', { class: 'muted' }, utc(report.since) + ' – ' + utc(report.until) + ', per ' + per
      + (per === 'day' ? ' (UTC)' : '')));
    const tiles = el('div', { class: 'tiles' });
    for (const k of OUTCOMES) tiles.append(tile('requests ' + k, int(num(req[k])), prefix + '.requests.' + k));
    tiles.append(tile('deferrals', int(num(totals.deferrals)), prefix + '.deferrals'));
    for (const k of KINDS) tiles.append(tile('recipients ' + k, int(num(rec[k])), prefix + '.recipients.' + k));
    // Left out because they are on the suppression list (never sent): counted apart from the kinds.
    tiles.append(tile('recipients suppressed', int(num(rec.suppressed)), prefix + '.recipients.suppressed',
      'on the suppression list, not sent'));
    tiles.append(tile('cost', money(budget.costPeriod, budget.currency), prefix + '.cost'));
    body.append(tiles);
    // How long mail takes: first seen -> HVE's 250 for the last transaction, over the window.
    const times = el('div', { class: 'tiles' });
    const lt = latency.totals || {};
    const sentCount = num(lt.count) + ' sent, histogram bucket upper bound';
    times.append(tile('send latency p50', lt.count ? seconds(lt.p50, latency.bounds) : '–', prefix + '.latency.p50', sentCount));
    times.append(tile('send latency p95', lt.count ? seconds(lt.p95, latency.bounds) : '–', prefix + '.latency.p95', sentCount));
    times.append(tile('slowest account (p95)', slowest ? slowest.account : '–', prefix + '.latency.slowest',
      slowest ? 'p95 ' + seconds(slowest.p95, latency.bounds) + ', p50 ' + seconds(slowest.p50, latency.bounds)
        + ', ' + slowest.count + ' sent' : 'nothing sent'));
    body.append(times);
    if (isTraced) {
      // Delivery results (message trace, recipients of the mail sent in this period) beside the outcomes.
      const r = results(delivery);
      const shown = el('div', { class: 'tiles' });
      for (const k of RESULT_KEYS) {
        if (k === 'other' && !r.other) continue;
        shown.append(tile(k, int(r[k]), prefix + '.results.' + k, pct(r[k], delivered) + ' of ' + delivered + ' traced'));
      }
      shown.append(tile('delivery rate', pct(r.delivered, delivered), prefix + '.delivery.rate',
        r.delivered + ' of ' + delivered + ' traced'));
      body.append(shown);
    }
    const buckets = perBucket(report, since, count, step);
    const charts = el('div', { class: 'charts' });
    charts.append(chart('Messages per ' + per + ' by outcome', OUTCOMES, buckets, since, step, prefix + '.outcomes'));
    if (isTraced) {
      const keys = RESULT_KEYS.filter((k) => k !== 'other' || buckets.some((b) => b.other));
      charts.append(chart('Delivery results per ' + per + ' (recipients, message trace)', keys, buckets, since, step,
        prefix + '.results'));
    }
    charts.append(chart('Recipients per ' + per + ': internal vs external', KINDS, buckets, since, step, prefix + '.recipients'));
    charts.append(latencyChart('Send latency per ' + per + ': p50 and p95', latency, since, count, step, prefix + '.latency'));
    body.append(charts);
    body.append(el('h3', {}, 'Send latency per ' + per + ' (first seen to HVE\'s 250; upper bound of the histogram bucket)'));
    body.append(latencyTable(latency, prefix, per));
    body.append(el('h3', {}, 'By category'));
    body.append(categoriesTable(report, prefix));
    body.append(el('h3', {}, 'Errors by SMTP reply'));
    body.append(errorsTable(report, prefix));
    if (isTraced) {
      body.append(el('h3', {}, 'Delivery (message trace, recipients)'));
      body.append(deliveryTable(delivery, prefix));
    }
    section.replaceChildren(heading, body);
  }

  function isoSeconds(date) { return date.toISOString().replace(/\.\d{3}Z$/, 'Z'); }

  async function fetchReport(query) {
    const url = new URL('report', location.href);
    url.search = new URLSearchParams(query).toString();
    const headers = { Accept: 'application/json' };
    if (KEY) headers['x-functions-key'] = KEY;
    const response = await fetch(url, { headers, cache: 'no-store', credentials: 'same-origin', referrerPolicy: 'no-referrer' });
    if (!response.ok) {
      let detail = '';
      try { detail = (await response.json()).error || ''; } catch (e) { /* not JSON */ }
      throw new Error('GET /report answered ' + response.status + (detail ? ': ' + detail : ''));
    }
    return response.json();
  }

  function reason(err) { return err && err.message ? err.message : String(err); }

  // The last 7 days as 7 UTC days, today included (one bar per day, not 168 hourly slivers).
  function weekStart(now) {
    const today = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate());
    return new Date(today - 6 * DAY);
  }

  async function refresh() {
    const now = new Date();
    const until = isoSeconds(now);
    const problem = document.getElementById('problem');
    const problems = [];
    // Each window on its own: a failing 7-day report leaves the 24-hour one fresh, and the reverse.
    const wantWeek = weekAt === null || now - weekAt >= WEEK_REFRESH_MS;
    const [day, week] = (await Promise.allSettled([
      fetchReport({ since: isoSeconds(new Date(now - 24 * HOUR)), until, bucket: 'hour' }),
      wantWeek ? fetchReport({ since: isoSeconds(weekStart(now)), until, bucket: 'day' }) : null,
    ])).map((result, i) => {
      if (result.status === 'fulfilled') return result.value;
      problems.push((i ? 'last 7 days' : 'last 24 hours') + ': ' + reason(result.reason));
      return null;
    });
    try {
      const latest = day || week;
      if (latest) {
        renderNow(latest);
        document.getElementById('updated').textContent = 'Updated ' + utc(latest.generatedAt)
          + ' · refreshes every ' + REFRESH_MS / 1000 + ' s (the last 7 days every '
          + WEEK_REFRESH_MS / 60000 + ' min)';
      }
      if (day) renderWindow(document.getElementById('w24'), day);
      if (week) {
        renderWindow(document.getElementById('w7d'), week);
        weekAt = now;
      }
    } catch (err) {
      problems.push('drawing: ' + reason(err));
    }
    // What could not be refreshed keeps its last numbers on screen; the banner says why.
    problem.textContent = problems.length ? 'Could not refresh ' + problems.join('; ') : '';
    problem.hidden = !problems.length;
    document.body.dataset.state = problems.length ? 'error' : 'ready';
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    setTimeout(refresh, REFRESH_MS);
  }

  refresh();
})();
