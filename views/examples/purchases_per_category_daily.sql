-- Purchases, units and revenue per product category and day (UTC).
-- Reads the catalog: events of products the catalog does not know count
-- under 'unknown'. Without an hour key, each batch run recomputes it whole.
-- readers: dashboard
SELECT date_trunc('day', e.event_time) AS day,
       COALESCE(p.category, 'unknown') AS category,
       count(*) AS purchases,
       sum(CAST(e.quantity AS BIGINT)) AS units,
       sum(CAST(e.quantity AS BIGINT) * e.price_cents) AS revenue_cents
FROM events AS e LEFT JOIN products AS p ON p.product_id = e.product_id
WHERE e.event_type = 'purchase'
GROUP BY 1, 2
