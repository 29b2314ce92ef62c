-- Hourly demand per product: what the marketing dashboards read
-- (serving.product_demand_hourly), and what the category, spike and
-- popularity views are built on. Its keys and measures are a contract of
-- DESIGN.md; its expressions may change (the batch then recomputes it).
-- readers: dashboard
SELECT date_trunc('hour', e.event_time) AS hour,
       e.product_id AS product_id,
       count(*) FILTER (WHERE e.event_type = 'page_view') AS views,
       count(*) FILTER (WHERE e.event_type = 'add_to_cart') AS cart_adds,
       count(*) FILTER (WHERE e.event_type = 'remove_from_cart') AS cart_removes,
       count(*) FILTER (WHERE e.event_type = 'purchase') AS purchases,
       sum(CAST(e.quantity AS BIGINT)) FILTER (WHERE e.event_type = 'purchase') AS units,
       sum(CAST(e.quantity AS BIGINT) * e.price_cents) FILTER (WHERE e.event_type = 'purchase') AS revenue_cents
FROM events AS e
GROUP BY 1, 2
