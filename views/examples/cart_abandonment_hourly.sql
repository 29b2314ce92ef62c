-- What happens to carts, per product and hour: products added, removed
-- and bought, and the last time one was added. The abandonment rate is
-- 1 - purchases / cart_adds, computed when reading (a ratio of two
-- measures, never a measure: ratios do not add up across hours).
-- readers: dashboard
SELECT date_trunc('hour', e.event_time) AS hour,
       e.product_id AS product_id,
       count(*) FILTER (WHERE e.event_type = 'add_to_cart') AS cart_adds,
       count(*) FILTER (WHERE e.event_type = 'remove_from_cart') AS cart_removes,
       count(*) FILTER (WHERE e.event_type = 'purchase') AS purchases,
       max(e.event_time) FILTER (WHERE e.event_type = 'add_to_cart') AS last_added_at
FROM events AS e
WHERE e.event_type IN ('add_to_cart', 'remove_from_cart', 'purchase')
GROUP BY 1, 2
