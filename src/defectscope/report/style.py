"""The report page's style sheet."""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
body.viewing { overflow: hidden; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 17px; margin: 26px 0 8px; }
.facts { color: #555; margin: 2px 0; }
table.metrics { border-collapse: collapse; } table.metrics td, table.metrics th { padding: 3px 12px;
  border-bottom: 1px solid #ddd; text-align: left; } table.metrics td.value { text-align: right;
  font-variant-numeric: tabular-nums; }
.header, .sections { display: flex; flex-wrap: wrap; gap: 6px 48px; align-items: flex-start; }
table.model th.row { color: #555; }
table.model td, table.model th { padding: 2px 12px; }
table.metrics tr.good th, table.metrics tr.good td { border-top: 2px solid #bbb; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plots svg { border: 1px solid #ddd; background: #fff; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 3px solid #ddd; padding: 4px; width: 214px; font-size: 12px; }
.card[data-overlay] { cursor: zoom-in; } .card[data-overlay]:hover, .card:focus { outline: 2px solid #2a7ab0; }
.thumb { width: 214px; height: 214px; background: #eee; display: flex; align-items: center;
  justify-content: center; margin-bottom: 3px; }
.thumb img { max-width: 100%; max-height: 100%; display: block; }
.card.fp, .card.fn, .card.error { border-color: #d0452f; background: #fdf0ed; }
.flag { color: #d0452f; font-weight: bold; }
.name { overflow-wrap: anywhere; font-weight: 600; }
.relative { margin-top: 2px; font-variant-numeric: tabular-nums; }
.meter { position: relative; height: 6px; background: #e4e4e4; border-radius: 3px; margin: 2px 0 1px; }
.meter .fill { position: absolute; left: 0; top: 0; bottom: 0; background: #2a7ab0; border-radius: 3px; }
.meter .fill.over { background: #d0452f; }
.meter .mark { position: absolute; top: -3px; bottom: -3px; width: 2px; background: #222; }
.rule { margin: 2px 0 4px; max-width: 960px; }
.note { border-left: 4px solid #e08a00; background: #fff6e6; padding: 4px 10px; margin: 6px 0; max-width: 940px; }
.tables { display: flex; flex-wrap: wrap; gap: 10px 36px; align-items: flex-start; margin-top: 8px; }
table.metrics caption { text-align: left; font-weight: bold; padding: 0 0 4px 12px; }
table.metrics th.row { font-weight: normal; } table.metrics td.sub { padding-left: 30px; }
table.metrics tr.over td, table.metrics td.wrong { color: #d0452f; font-weight: bold; }
.small { color: #555; font-size: 13px; }
.viewer { position: fixed; inset: 0; background: rgba(20, 20, 20, 0.94); display: flex; flex-direction: column;
  z-index: 10; color: #eee; }
.viewer[hidden] { display: none; }
.viewer-bar { display: flex; gap: 8px; align-items: center; padding: 8px 12px; flex-wrap: wrap; }
.viewer-bar #viewer-title { font-weight: 600; margin-right: auto; white-space: pre; }
.viewer-bar button { font: inherit; padding: 3px 10px; border: 1px solid #888; background: #333; color: #eee;
  border-radius: 3px; cursor: pointer; }
.viewer-bar button[aria-pressed="true"] { background: #2a7ab0; border-color: #2a7ab0; }
.viewer-bar .keys { color: #aaa; font-size: 12px; }
.viewer-stage { flex: 1; min-height: 0; display: flex; align-items: center; justify-content: center;
  overflow: auto; padding: 0 12px 12px; }
.viewer-stage img { max-width: 100%; max-height: 100%; object-fit: contain; background: #000; }
.viewer-stage.actual { display: block; } .viewer-stage.actual img { max-width: none; max-height: none; }
"""
